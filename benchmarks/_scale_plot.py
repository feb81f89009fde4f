"""Draw the growth curves of ``benchmarks/scale.py`` as a small, hand-written SVG.

Two log-log panels from the benchmark's JSON output: the fresh open of a replica
against the number of clients (live and churned, next to plain nats-py reading the
same bucket), and the cleanup of a dead node against its number of clients (next to
nats-py deleting as many keys). The targets of issue 10 are marked. No plotting
library: the output is plain SVG 1.1 text.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 760, 395
PANEL_WIDTH, PANEL_HEIGHT = 270, 200
LEFT, TOP = 70, 70
GAP = 110
FONT = 'font-family="Helvetica, Arial, sans-serif"'

BLUE, RED, GREEN, GREY = "#1f5fa8", "#c0392b", "#2e8b57", "#777777"


def _median(runs: Iterable[dict[str, Any]], field: str) -> float:
    runs = list(runs)
    if not runs or any(field not in run for run in runs):
        return math.inf if runs else math.nan
    return float(statistics.median(run[field] for run in runs))


def _label(value: float) -> str:
    """A decade's label: 1k, 10k, 1M, 0.1, 1, 10..."""
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1_000:
        return f"{value / 1_000:g}k"
    return f"{value:g}"


class Panel:
    """One log-log panel at (x0, y0) covering the given decades."""

    def __init__(self, x0: float, title: str, xs: list[float], ys: list[float]) -> None:
        self.x0, self.y0 = x0, TOP
        self.title = title
        finite_x = [x for x in xs if x > 0]
        finite_y = [y for y in ys if math.isfinite(y) and y > 0]
        self.x_lo = math.floor(math.log10(min(finite_x)) - 0.3)
        self.x_hi = math.ceil(math.log10(max(finite_x)) + 0.3)
        self.y_lo = math.floor(math.log10(min(finite_y)) - 0.05) if finite_y else -2
        self.y_hi = math.ceil(math.log10(max(finite_y)) + 0.05) if finite_y else 1
        if self.y_hi <= self.y_lo:
            self.y_hi = self.y_lo + 1
        self.parts: list[str] = []

    def x(self, value: float) -> float:
        share = (math.log10(value) - self.x_lo) / (self.x_hi - self.x_lo)
        return self.x0 + share * PANEL_WIDTH

    def y(self, value: float) -> float:
        share = (math.log10(value) - self.y_lo) / (self.y_hi - self.y_lo)
        return self.y0 + PANEL_HEIGHT - share * PANEL_HEIGHT

    def axes(self, x_title: str) -> None:
        x0, y0, w, h = self.x0, self.y0, PANEL_WIDTH, PANEL_HEIGHT
        self.parts.append(
            f'<text x="{x0 + w / 2}" y="{y0 - 30}" text-anchor="middle" font-size="14" '
            f'font-weight="bold" {FONT}>{escape(self.title)}</text>'
        )
        for decade in range(self.x_lo, self.x_hi + 1):
            x = self.x(10.0**decade)
            self.parts.append(
                f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + h}" stroke="#e4e4e4"/>'
            )
            self.parts.append(
                f'<text x="{x:.1f}" y="{y0 + h + 16}" text-anchor="middle" font-size="11" '
                f"{FONT}>{_label(10.0**decade)}</text>"
            )
        for decade in range(self.y_lo, self.y_hi + 1):
            y = self.y(10.0**decade)
            self.parts.append(
                f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#e4e4e4"/>'
            )
            self.parts.append(
                f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                f"{FONT}>{_label(10.0**decade)} s</text>"
            )
        self.parts.append(
            f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#444"/>'
        )
        self.parts.append(
            f'<text x="{x0 + w / 2}" y="{y0 + h + 34}" text-anchor="middle" font-size="12" '
            f"{FONT}>{escape(x_title)}</text>"
        )

    def series(
        self, points: list[tuple[float, float]], color: str, *, dashed: bool = False
    ) -> None:
        """A line through the finite points, a dot on each, and a "failed" mark at
        the top for each point that failed (infinite)."""
        good = [(x, y) for x, y in points if math.isfinite(y) and y > 0]
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        if len(good) > 1:
            path = " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in good)
            self.parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
            )
        for x, y in good:
            fill = "white" if dashed else color
            self.parts.append(
                f'<circle cx="{self.x(x):.1f}" cy="{self.y(y):.1f}" r="3.5" fill="{fill}" '
                f'stroke="{color}" stroke-width="1.5"/>'
            )
        for x, y in points:
            if math.isinf(y):
                self.parts.append(
                    f'<text x="{self.x(x):.1f}" y="{self.y0 + 14}" text-anchor="middle" '
                    f'font-size="11" fill="{color}" {FONT}>failed</text>'
                )

    def target(self, x: float, y: float, text: str) -> None:
        if not (10.0**self.y_lo <= y <= 10.0**self.y_hi):
            return
        cx, cy = self.x(x), self.y(y)
        self.parts.append(
            f'<path d="M{cx - 5:.1f},{cy - 5:.1f} L{cx + 5:.1f},{cy + 5:.1f} '
            f'M{cx - 5:.1f},{cy + 5:.1f} L{cx + 5:.1f},{cy - 5:.1f}" stroke="black" '
            f'stroke-width="1.5"/>'
        )
        self.parts.append(
            f'<text x="{cx + 8:.1f}" y="{cy + 4:.1f}" font-size="11" {FONT}>{escape(text)}</text>'
        )

    def legend(self, entries: list[tuple[str, str, bool]]) -> None:
        for row, (text, color, dashed) in enumerate(entries):
            y = self.y0 + PANEL_HEIGHT + 54 + row * 15
            x = self.x0 + 4
            dash = ' stroke-dasharray="5,4"' if dashed else ""
            self.parts.append(
                f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{color}" '
                f'stroke-width="2"{dash}/>'
            )
            self.parts.append(
                f'<text x="{x + 30}" y="{y}" font-size="11" {FONT}>{escape(text)}</text>'
            )


def render_svg(output: dict[str, Any]) -> str:
    """The SVG text of the growth curves in ``output`` (``scale.py --json``)."""
    opens = output.get("open", [])
    cleanups = output.get("cleanup", [])

    def open_points(state: str, baseline: bool) -> list[tuple[float, float]]:
        points = []
        for entry in opens:
            data = entry.get(state, {})
            if baseline:
                base = data.get("baseline")
                if base is not None:
                    points.append((entry["clients"], _median([base], "read_s")))
            else:
                points.append((entry["clients"], _median(data.get("runs", []), "open_s")))
        return points

    series_open = {
        (state, baseline): open_points(state, baseline)
        for state in ("live", "churned")
        for baseline in (False, True)
    }
    cleanup_points = [(c["clients"], _median(c["runs"], "cleanup_s")) for c in cleanups]
    baseline_points = [(c["clients"], _median([c["baseline"]], "delete_s")) for c in cleanups]

    open_ys = [y for points in series_open.values() for _, y in points] + [3.0]
    open_panel = Panel(
        LEFT, "Fresh open of a replica", [c["clients"] for c in opens] or [1e4], open_ys
    )
    open_panel.axes("live clients in the bucket")
    open_panel.series(series_open["live", True], BLUE, dashed=True)
    open_panel.series(series_open["churned", True], RED, dashed=True)
    open_panel.series(series_open["live", False], BLUE)
    open_panel.series(series_open["churned", False], RED)
    open_panel.target(100_000, 3.0, "target, churned")
    open_panel.legend(
        [
            ("meshline, live", BLUE, False),
            ("meshline, churned (as many gone)", RED, False),
            ("nats-py reads the bucket (live, churned)", GREY, True),
        ]
    )

    cleanup_ys = [y for _, y in cleanup_points + baseline_points] + [1.0]
    cleanup_panel = Panel(
        LEFT + PANEL_WIDTH + GAP,
        "Cleanup of a dead node",
        [c["clients"] for c in cleanups] or [1e4],
        cleanup_ys,
    )
    cleanup_panel.axes("clients of the dead node")
    cleanup_panel.series(baseline_points, GREY, dashed=True)
    cleanup_panel.series(cleanup_points, GREEN)
    cleanup_panel.target(10_000, 1.0, "target")
    cleanup_panel.legend(
        [
            ("meshline cleanup_node", GREEN, False),
            ("nats-py deletes, 64 in flight", GREY, True),
        ]
    )

    caption = (
        f"benchmarks/scale.py, profile {output.get('profile', '?')}, "
        f"{output.get('rounds', '?')} round(s), medians; {output.get('machine', '')}; "
        f"{output.get('started', '')}; meshline sources {output.get('meshline_sources', '?')}"
    )
    body = "\n".join(open_panel.parts + cleanup_panel.parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}">\n'
        f"<title>meshline: how opening a replica and cleaning up a dead node grow "
        f"with the number of clients</title>\n"
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>\n'
        f"{body}\n"
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle" font-size="10" '
        f'fill="#555" {FONT}>{escape(caption)}</text>\n'
        "</svg>\n"
    )
