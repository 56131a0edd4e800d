"""The report's SVG histograms (evaluation/svgplot.py): valid SVG, the counts drawn to scale,
thresholds and series named in the legend, labels escaped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from evaluation import svgplot

NS = {"s": "http://www.w3.org/2000/svg"}


@pytest.mark.parametrize(
    ("lo", "hi", "target", "integer", "expected"),
    [
        (-0.2, 1.0, 7, False, [-0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (-0.2, 1.0, 5, False, [0.0, 0.25, 0.5, 0.75, 1.0]),
        (0.0, 1.05, 5, True, [0.0, 1.0]),
        (0.0, 504.0, 5, True, [0.0, 100.0, 200.0, 300.0, 400.0, 500.0]),
        (0.0, 13.0, 5, True, [0.0, 5.0, 10.0]),
        (0.0, 13.0, 7, True, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]),
        (0.5, 109.5, 7, False, [20.0, 40.0, 60.0, 80.0, 100.0]),
    ],
)
def test_nice_ticks(lo, hi, target, integer, expected):
    ticks = svgplot.nice_ticks(lo, hi, target, integer=integer)
    assert ticks == pytest.approx(expected)
    assert all(str(t) != "-0.0" for t in ticks)


def _doc(panels):
    return ET.fromstring(svgplot.figure(panels))


def test_histogram_bars_are_drawn_to_scale_and_named():
    edges = np.linspace(0.0, 1.0, 5)  # four bins
    counts = np.array([0, 10, 5, 0])
    panel = svgplot.Panel(
        edges,
        [svgplot.Series("auto (15)", counts, "tab:green")],
        [svgplot.VLine("attach 0.56", 0.56, "--"), svgplot.VLine("merge <b>", 0.7, ":")],
        title="t",
        xlabel="cosine",
        ylabel="faces",
    )
    root = _doc([panel])
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"auto (15)", "attach 0.56", "merge <b>", "t", "cosine", "faces"} <= set(texts)
    (path,) = root.findall(".//s:path", NS)
    pts = [tuple(map(float, p)) for p in re.findall(r"([-\d.]+),([-\d.]+)", path.get("d"))]
    base_y = pts[0][1]
    heights = sorted({round(base_y - y, 1) for _, y in pts})
    # 0, the 5-count bin and the 10-count bin: the second twice the first
    assert heights[0] == 0 and heights[2] == pytest.approx(2 * heights[1], abs=0.2)
    lines = [ln for ln in root.findall(".//s:line", NS) if ln.find("s:title", NS) is not None]
    assert [ln.find("s:title", NS).text for ln in lines] == ["attach 0.56", "merge <b>"]
    assert lines[0].get("stroke-dasharray") == "6,4"


def test_empty_panel_says_so_and_figures_lay_panels_side_by_side():
    a = svgplot.Panel(np.linspace(0, 1, 3), [], empty_text="no idcard decisions", width=300)
    b = svgplot.Panel(np.linspace(0, 1, 3), [svgplot.Series("x", np.array([1, 2]), "#123456")])
    root = _doc([a, b])
    assert float(root.get("width")) == 300 + b.width
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "no idcard decisions" in texts
    assert root.findall(".//s:path", NS)[0].get("fill") == "#123456"


def test_a_sparse_histogram_stays_small():
    """One bin per identity size up to the largest: a store with one 100,000-face identity
    must not write a path point per empty bin."""
    counts = np.zeros(100_000)
    counts[[0, 1, 2, 40, 99_999]] = [500, 200, 30, 2, 1]
    edges = np.arange(1, len(counts) + 2) - 0.5
    svg = svgplot.figure([svgplot.Panel(edges, [svgplot.Series("ids", counts, "tab:green")])])
    assert len(svg) < 8_000
    (path,) = ET.fromstring(svg).findall(".//s:path", NS)
    assert len(re.findall(r"[ML]", path.get("d"))) == 2 + 2 * 7  # start, end, 7 runs
