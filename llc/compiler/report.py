"""The partition as a picture: one HTML file with inline SVG, no scripts, no network.

Layers are coloured by the device that runs them; each device shows its memory
against its limit and its predicted compute and hop time per token.
"""

from __future__ import annotations

import dataclasses

import jinja2

from llc.bundle.schema import PlanDoc

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
MIB = 1 << 20


def render_report(plan: PlanDoc, env: jinja2.Environment) -> str:
    colour = {s.device: PALETTE[i % len(PALETTE)] for i, s in enumerate(plan.stages)}
    owner = {b: s.device for s in plan.stages for b in range(s.blocks[0], s.blocks[1] + 1)}
    total = sum(max(b.gflops_decode, 1e-9) for b in plan.blocks)
    x, cells = 0.0, []
    width = 900.0
    for b in plan.blocks:  # width of a block ~ its decode FLOPs, so the bar reads as time
        w = max(b.gflops_decode, 1e-9) / total * width
        cells.append({"x": x, "w": w, "label": b.label, "device": owner[b.index],
                      "colour": colour[owner[b.index]], "gflops": b.gflops_decode, "mb": b.weight_bytes / MIB})
        x += w
    rows = [{**dataclasses.asdict(s), "colour": colour[s.device],
             "mem_mb": s.memory_bytes / MIB, "limit_mb": s.memory_limit_bytes / MIB,
             "mem_frac": min(s.memory_bytes / max(s.memory_limit_bytes, 1), 1.0)}
            for s in plan.stages]
    html_env = jinja2.Environment(loader=env.loader, autoescape=True)
    return html_env.get_template("report.html.j2").render(plan=plan, cells=cells, rows=rows, width=width)
