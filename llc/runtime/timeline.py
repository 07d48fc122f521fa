"""The pipeline timeline as a picture: one row per device, one bar per step it ran.

Colour is the request, so with several requests in flight one sees the stages
working on different requests at once (or waiting on each other). Times are
each device's wall clock (the same clock on the local target; NTP-close on
phones), shifted so the first event starts at 0.

Below it, when the balancer watched the run, its view: each device's measured
ms per decode step over the plan's prediction, window by window, and the moves.
"""

from __future__ import annotations

from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")


def render_pace(windows: list[dict], moves: list[dict]) -> str:
    """An SVG: per device, measured/predicted ms per decode step at each window (``at_s``), a line per
    device, and a dashed line at each move (``at_s``, ``reason``). Empty without windows."""
    if not windows:
        return ""
    devices = sorted({d for w in windows for d in w["ms_per_step"]})
    points = {d: [(w["at_s"], w["ms_per_step"][d] / w["predicted_ms_per_step"][d]) for w in windows
                  if w["predicted_ms_per_step"].get(d)] for d in devices}
    t1 = max([w["at_s"] for w in windows] + [m["at_s"] for m in moves]) or 1.0
    top = max(r for ps in points.values() for _, r in ps) * 1.1 or 1.0
    width, height, left, bottom = 1100.0, 220, 110.0, 30
    x = lambda t: left + t / t1 * (width - left - 10)  # noqa: E731
    y = lambda r: 20 + (1 - r / top) * (height - bottom - 20)  # noqa: E731
    parts = [f'<line x1="{left}" y1="{y(1):.1f}" x2="{width - 10}" y2="{y(1):.1f}" stroke="#999" '
             f'stroke-dasharray="2 3"/><text x="4" y="{y(1) + 4:.1f}" font-size="11">as planned (1x)</text>']
    for m in moves:
        parts.append(f'<line x1="{x(m["at_s"]):.1f}" y1="16" x2="{x(m["at_s"]):.1f}" y2="{height - bottom}" '
                     f'stroke="#e15759" stroke-dasharray="5 3"><title>{escape(m["reason"])}</title></line>'
                     f'<text x="{x(m["at_s"]) + 3:.1f}" y="28" font-size="11" fill="#e15759">move</text>')
    for i, d in enumerate(devices):
        colour = PALETTE[i % len(PALETTE)]
        line = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r in points[d])
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>'
                     + "".join(f'<circle cx="{x(t):.1f}" cy="{y(r):.1f}" r="3" fill="{colour}">'
                               f'<title>{escape(d)} at {t:.1f} s: {r:.2f}x the plan</title></circle>'
                               for t, r in points[d]))
        parts.append(f'<text x="{width - 200}" y="{40 + 14 * i}" font-size="11" fill="{colour}">'
                     f'{escape(d)}</text>')
    for i in range(6):
        t = t1 * i / 5
        parts.append(f'<text x="{x(t):.1f}" y="{height - 10}" font-size="11" text-anchor="middle">{t:.0f} s</text>')
    return (f'<h3>the balancer\'s view <small style="color:#666">measured ms per decode step / the plan\'s, '
            f'per window (top: {top:.1f}x)</small></h3><svg width="{width + 10:.0f}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">' + "".join(parts) + "</svg>")


def render_timeline(events: dict[str, list[dict]], order: list[str], title: str = "", pace: str = "") -> str:
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
            + "".join(parts) + "</svg>" + pace + "</body></html>")
