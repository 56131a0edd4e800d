"""Histograms of already counted bins as SVG text: the run report's plots without a plotting
library.

Every refresh that adds faces writes a report with three histograms. Drawing them with
matplotlib cost ~1.3 s of a 200-photo refresh's ~15 s (importing pyplot ~0.8 s, rendering and
PNG-encoding three figures ~0.5 s; docs/SCALING.md, thirty-first session); this module writes
the same content (step histograms per status, threshold lines named in a legend, integer count
ticks) as a few kilobytes of SVG in about a millisecond, which browsers and the Prefect UI show
as an ``<img>`` data URI and which stays sharp at any zoom.

Only what the report needs: a panel is an x range cut into bins, filled step outlines
(one per series, translucent so overlaps show), optional vertical lines, axes with "nice" ticks,
a title, axis labels and a legend to the right. :func:`figure` lays panels out side by side.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# matplotlib's "tab10" colours, the names the report used.
COLOURS = {
    "tab:blue": "#1f77b4",
    "tab:orange": "#ff7f0e",
    "tab:green": "#2ca02c",
    "tab:red": "#d62728",
    "tab:gray": "#7f7f7f",
}
# Line styles as matplotlib spells them -> SVG dash arrays.
DASHES = {"-": "", "--": "6,4", ":": "1.5,3", "-.": "6,3,1.5,3"}
FONT = "DejaVu Sans, Verdana, Arial, sans-serif"

# Panel geometry (px): plot area inside margins; the legend column sits right of the plot area.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 52, 12, 26, 40
LEGEND_WIDTH = 130


@dataclass(frozen=True)
class Series:
    """One filled step outline: ``counts`` per bin of the panel's edges."""

    label: str
    counts: np.ndarray
    colour: str
    alpha: float = 0.55


@dataclass(frozen=True)
class VLine:
    """A vertical line at ``x`` (data units), named in the legend."""

    label: str
    x: float
    style: str = "--"


def nice_ticks(lo: float, hi: float, target: int = 6, integer: bool = False) -> list[float]:
    """Tick values inside ``[lo, hi]`` at a 1-2-2.5-5 x 10^k step, the step whose tick count is
    nearest ``target`` (the larger step on a tie); with ``integer`` only whole steps (counts
    have no fractional ticks)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    mag = 10.0 ** math.floor(math.log10((hi - lo) / max(1, target)))
    steps = [m * mag * f for f in (0.1, 1.0, 10.0) for m in (1.0, 2.0, 2.5, 5.0)]
    if integer:
        steps = [st for st in steps if st >= 1 and float(st).is_integer()] or [1.0]

    def ticks(step: float) -> list[float]:
        first = math.ceil(lo / step - 1e-9) * step
        n = math.floor((hi - first) / step + 1e-9) + 1
        return [round(first + i * step, 10) + 0.0 for i in range(max(0, n))]  # no -0.0

    candidates = (ticks(st) for st in sorted(steps, reverse=True))
    return min(candidates, key=lambda t: abs(len(t) - target))


def _fmt_tick(v: float, step: float) -> str:
    if step >= 1 and float(v).is_integer():
        return str(int(v))
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    if not float(step * 10**decimals).is_integer():  # e.g. 0.25
        decimals += 1
    return f"{v:.{decimals}f}"


def _text(x: float, y: float, s: str, size: int = 11, anchor: str = "middle", **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
        f"{html.escape(s)}</text>"
    )


@dataclass(frozen=True)
class Panel:
    """One histogram: ``edges`` (n+1 bin edges) shared by every series."""

    edges: np.ndarray
    series: Sequence[Series] = ()
    vlines: Sequence[VLine] = ()
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    empty_text: str = ""  # shown in the middle when no series has a count
    legend: bool = True
    width: int = 520  # the whole panel, legend column included when there is a legend
    height: int = 300

    def drawn(self) -> list[Series]:
        """The series with any count: the ones drawn and named in the legend."""
        return [s for s in self.series if np.asarray(s.counts).sum() > 0]

    def has_data(self) -> bool:
        return bool(self.drawn())

    def _legend_items(self) -> list[tuple[str, str]]:
        items = [
            (
                f'<rect width="18" height="9" fill="{COLOURS.get(s.colour, s.colour)}" '
                f'fill-opacity="{s.alpha}" stroke="{COLOURS.get(s.colour, s.colour)}"/>',
                s.label,
            )
            for s in self.drawn()
        ]
        items += [
            (
                f'<line x1="0" y1="4.5" x2="18" y2="4.5" stroke="#000" stroke-width="1.2" '
                f'stroke-dasharray="{DASHES.get(v.style, "")}"/>',
                v.label,
            )
            for v in self.vlines
        ]
        return items

    def svg(self) -> str:
        """The panel as an SVG ``<g>`` element of ``width`` x ``height`` px at the origin."""
        legend = self._legend_items() if self.legend else []
        right = MARGIN_RIGHT + (LEGEND_WIDTH if legend else 0)
        x0, y0 = MARGIN_LEFT, MARGIN_TOP
        pw = max(10, self.width - MARGIN_LEFT - right)
        ph = max(10, self.height - MARGIN_TOP - MARGIN_BOTTOM)
        edges = np.asarray(self.edges, dtype=np.float64)
        lo, hi = float(edges[0]), float(edges[-1])
        for v in self.vlines:
            lo, hi = min(lo, v.x), max(hi, v.x)
        top = max([float(np.max(s.counts)) for s in self.series if len(s.counts)] or [0.0])
        ymax = max(top * 1.05, 1.0)  # a little headroom above the tallest bin
        yticks = nice_ticks(0.0, ymax, 5, integer=True)

        def sx(x: float) -> float:
            return x0 + (x - lo) / (hi - lo) * pw

        def sy(y: float) -> float:
            return y0 + ph - y / ymax * ph

        out = ['<g font-family="' + FONT + '">']
        out.append(
            f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="#fff" stroke="#000" '
            'stroke-width="0.8"/>'
        )
        for s in self.drawn():
            c = np.asarray(s.counts, dtype=np.float64)
            colour = COLOURS.get(s.colour, s.colour)
            pts = [f"M{sx(edges[0]):.1f},{sy(0):.1f}"]
            # One step per run of equal counts: the path grows with the changes, not the bins
            # (an identity-size histogram of a large store has one bin per size up to the
            # largest identity, nearly all empty).
            for first, end, n in _runs(c):
                x_a, x_b, y = sx(edges[first]), sx(edges[end]), sy(n)
                pts.append(f"L{x_a:.1f},{y:.1f}L{x_b:.1f},{y:.1f}")
            pts.append(f"L{sx(edges[-1]):.1f},{sy(0):.1f}Z")
            out.append(
                f'<path d="{"".join(pts)}" fill="{colour}" fill-opacity="{s.alpha}">'
                f"<title>{html.escape(s.label)}</title></path>"
            )
        for v in self.vlines:
            dash = DASHES.get(v.style, "")
            out.append(
                f'<line x1="{sx(v.x):.1f}" y1="{y0}" x2="{sx(v.x):.1f}" y2="{y0 + ph}" '
                f'stroke="#000" stroke-width="1.2" stroke-dasharray="{dash}">'
                f"<title>{html.escape(v.label)}</title></line>"
            )
        xticks = [t for t in nice_ticks(lo, hi, 7) if lo - 1e-9 <= t <= hi + 1e-9]
        xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
        for t in xticks:
            out.append(
                f'<line x1="{sx(t):.1f}" y1="{y0 + ph}" x2="{sx(t):.1f}" y2="{y0 + ph + 4}" '
                'stroke="#000" stroke-width="0.8"/>'
            )
            out.append(_text(sx(t), y0 + ph + 15, _fmt_tick(t, xstep), 10))
        for t in yticks:
            out.append(
                f'<line x1="{x0 - 4}" y1="{sy(t):.1f}" x2="{x0}" y2="{sy(t):.1f}" '
                'stroke="#000" stroke-width="0.8"/>'
            )
            out.append(_text(x0 - 6, sy(t) + 3.5, _fmt_tick(t, 1.0), 10, "end"))
        if self.title:
            out.append(_text(x0 + pw / 2, y0 - 9, self.title, 12))
        if self.xlabel:
            out.append(_text(x0 + pw / 2, y0 + ph + 32, self.xlabel, 11))
        if self.ylabel:
            yc = y0 + ph / 2
            out.append(_text(14, yc, self.ylabel, 11, transform=f"rotate(-90 14 {yc:.1f})"))
        if self.empty_text and not self.has_data():
            out.append(_text(x0 + pw / 2, y0 + ph / 2, self.empty_text, 11, fill="#666"))
        lx = x0 + pw + 10
        for i, (mark, label) in enumerate(legend):
            ly = y0 + 2 + i * 15
            out.append(f'<g transform="translate({lx:.1f},{ly:.1f})">{mark}</g>')
            out.append(_text(lx + 23, ly + 8.5, label, 9, "start"))
        out.append("</g>")
        return "".join(out)


def _runs(counts: np.ndarray) -> list[tuple[int, int, float]]:
    """``(first bin, end bin, count)`` for each run of equal consecutive counts."""
    if not len(counts):
        return []
    cuts = np.flatnonzero(np.diff(counts) != 0) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(counts)]])
    return [(int(a), int(b), float(counts[a])) for a, b in zip(starts, ends, strict=True)]


def figure(panels: Sequence[Panel]) -> str:
    """A standalone SVG document with ``panels`` side by side."""
    width = sum(p.width for p in panels)
    height = max((p.height for p in panels), default=0)
    body, x = [], 0
    for p in panels:
        body.append(f'<g transform="translate({x},0)">{p.svg()}</g>')
        x += p.width
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><rect width="{width}" height="{height}" fill="#fff"/>'
        + "".join(body)
        + "</svg>"
    )


def b64(svg: str) -> str:
    """``svg`` base64-encoded, for a ``data:image/svg+xml;base64,`` URI."""
    return base64.b64encode(svg.encode("utf-8")).decode("ascii")
