"""What every benchmark writes: a markdown table (printed, and saved beside the JSON) and a picture.

The charts are SVG drawn by hand (a few rects and labels): no plotting library to install.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def logger(tag: str):
    """A progress printer for one benchmark: stderr, so stdout keeps only the table."""
    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)
    return log


def markdown(head: list[str], rows: list[list]) -> str:
    """A markdown table of one header row and the given rows (cells already formatted)."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def write(json_path: Path, doc: dict, table: str, svg: str | None = None) -> None:
    """Print the table; write the JSON, the table as ``.md`` and the picture as ``.svg`` beside it."""
    print(table)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(table + "\n")
    if svg is not None:
        json_path.with_suffix(".svg").write_text(svg)
    print(f"wrote {json_path}, .md" + (" and .svg" if svg is not None else ""), file=sys.stderr)


def grouped_bars(title: str, labels: list[str], series: list[tuple[str, str, list[float]]], width: int = 640,
                 height: int = 300, digits: int = 0) -> str:
    """One group of bars per label, one bar per series (name, colour, a value per label), values on top
    (with ``digits`` decimals)."""
    top = max(max(values) for _, _, values in series) * 1.15 or 1.0
    left, bottom = 50, 12 + 12 * max(label.count("\n") + 1 for label in labels) + 16
    group = (width - left - 20) / len(labels)
    bar = (group - 12) / len(series)
    legend = ", ".join(f'<tspan fill="{colour}">{name}</tspan>' for name, colour, _ in series)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><text x="{left}" y="14">{title}: {legend}</text>']
    for i, label in enumerate(labels):
        x = left + i * group
        for j, (_, colour, values) in enumerate(series):
            bh = values[i] / top * (height - bottom - 30)
            if values[i] > 0:  # 0: not measured
                parts.append(f'<rect x="{x + 6 + j * bar:.1f}" y="{height - bottom - bh:.1f}" width="{bar:.1f}" '
                             f'height="{bh:.1f}" fill="{colour}"/><text x="{x + 6 + j * bar + 2:.1f}" '
                             f'y="{height - bottom - bh - 3:.1f}">{values[i]:,.{digits}f}</text>')
        lines = "".join(f'<tspan x="{x + group / 2:.1f}" dy="{0 if k == 0 else 12}">{line}</tspan>'
                        for k, line in enumerate(label.split("\n")))  # a label may take several lines
        parts.append(f'<text y="{height - bottom + 14}" text-anchor="middle">{lines}</text>')
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - 20}" y2="{height - bottom}" '
                 f'stroke="#333"/></svg>')
    return "".join(parts)
