"""The pipeline timeline as a picture: one row per device, one bar per step it ran.

Colour is the request, so with several requests in flight one sees the stages
working on different requests at once (or waiting on each other). Times are
each device's wall clock (the same clock on the local target; NTP-close on
phones), shifted so the first event starts at 0.
"""

from __future__ import annotations

from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")


def render_timeline(events: dict[str, list[dict]], order: list[str], title: str = "") -> str:
    """``events[device]`` = [{"rid", "step", "start", "end", "slot", "rows"}] with times in seconds.

    A batched step is one bar split in ``rows`` stripes, ``slot`` being the request's.
    """
    all_ev = [e for dev in order for e in events.get(dev, [])]
    if not all_ev:
        return "<!doctype html><p>no events recorded</p>"
    t0 = min(e["start"] for e in all_ev)
    t1 = max(e["end"] for e in all_ev)
    span = max(t1 - t0, 1e-6)
    width, left, row = 1100.0, 110.0, 34
    rids = sorted({e["rid"] for e in all_ev})
    colour = {rid: PALETTE[i % len(PALETTE)] for i, rid in enumerate(rids)}
    number = {rid: i for i, rid in enumerate(rids)}  # request ids are long; show their order
    parts = []
    for r, dev in enumerate(order):
        y = 30 + r * row
        parts.append(f'<text x="4" y="{y + 17}" font-size="12">{escape(dev)}</text>')
        for e in events.get(dev, []):
            x = left + (e["start"] - t0) / span * (width - left)
            w = max((e["end"] - e["start"]) / span * (width - left), 0.5)
            kind = "prefill" if e["step"] == 0 else f"decode {e['step']}"
            h = 24 / e.get("rows", 1)
            parts.append(
                f'<rect x="{x:.2f}" y="{y + h * e.get("slot", 0):.2f}" width="{w:.2f}" height="{h:.2f}" '
                f'fill="{colour[e["rid"]]}">'
                f'<title>request {number[e["rid"]]} {kind}: {(e["end"] - e["start"]) * 1e3:.2f} ms</title></rect>')
    height = 30 + len(order) * row + 30
    for i in range(11):  # time axis
        x = left + i / 10 * (width - left)
        parts.append(f'<line x1="{x:.1f}" y1="24" x2="{x:.1f}" y2="{height - 24}" stroke="#ddd"/>'
                     f'<text x="{x:.1f}" y="{height - 8}" font-size="11" text-anchor="middle">'
                     f'{span * i / 10 * 1e3:.0f} ms</text>')
    legend = " ".join(f'<span style="color:{colour[r]}">&#9632; request {number[r]}</span>'
                      for r in rids[:10])
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>llc timeline</title></head>'
            f'<body style="font:14px system-ui,sans-serif;margin:20px"><h3>llc pipeline timeline '
            f'<small style="color:#666">{escape(title)}</small></h3><p>{legend}</p>'
            f'<svg width="{width + 10:.0f}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            + "".join(parts) + "</svg></body></html>")
