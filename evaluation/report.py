"""HTML run report: one self-contained file (plots as base64 SVG, crops as JPEG) per refresh.

Sections: the run (nested values as rows), faces and images by status (quarantined counted
over both tables, as the run totals count them), thresholds, similarity histograms of accepted /
reviewed / rejected decisions against the active thresholds (album and ID-card decisions
separately, since their scores mean different things; thresholds named in the legend so labels
never overlap), identity-size and quality distributions, a contact sheet per identity (sample
crops, each captioned with identity, reason code and score, so a reader sees whether an identity
is pure), the quarantined images with their reasons, and, when a truth is known
(``faceloop eval``), the evaluation figures.

Privacy: face crops are biometric data. ``privacy="blur"`` blurs every crop until it is not
recognisable, ``"omit"`` leaves the contact sheets out, ``"none"`` shows crops as stored.
Quarantined images never appear as crops. The quarantined-images table names a file by its
basename only: full URIs carry home folders, bucket names and account paths that a report
passed around should not, and the basename with its group is enough to find the file in the
images table (``faceloop explain``); ID-card subjects are shown by the store's keyed
pseudonym (as in datasets and Label Studio), in reasons too.
"""

from __future__ import annotations

import base64
import hmac
import html
import io
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from evaluation import svgplot
from faceloop.config import PolicyThresholds
from faceloop.vocab import ImageStatus, Status, row_reason_code
from storage import layout
from tasks.summary import (
    KINDS,
    QUALITY_EDGES,
    SIM_EDGES,
    UNNAMED_KEEP,
    PlotCounts,
    RunSummary,
    plot_counts,
)

log = logging.getLogger(__name__)

STATUS_ORDER = (Status.AUTO, Status.HUMAN, Status.REVIEW, Status.REJECTED, Status.QUARANTINED)
STATUS_COLOURS = {
    Status.AUTO: "tab:green",
    Status.HUMAN: "tab:blue",
    Status.REVIEW: "tab:orange",
    Status.REJECTED: "tab:red",
    Status.QUARANTINED: "tab:gray",
}
PRIVACY_MODES = ("none", "blur", "omit")
REPORT_COLUMNS = (
    "face_id",
    "source_kind",
    "role",
    "status",
    "reason",
    "score",
    "quality",
    "identity_id",
    "aligned_jpeg",
    "reason_code",
)
IMAGE_COLUMNS = ("image_uri", "source_kind", "source_group", "role", "status", "reason", "run_id")
MAX_IDENTITIES = 12  # contact sheets: identities shown
# Faces (rows with face_id, source_kind, source_group) -> face_id -> their crop's JPEG bytes.
CropLoader = Callable[[Sequence[Mapping[str, Any]]], Mapping[str, "bytes | None"]]
MAX_QUARANTINED_ROWS = 200


THRESHOLD_STYLES = ("--", ":", "-.")
PLOT_MIME = "image/svg+xml"  # the plots' data URIs (contact sheets stay JPEG/PNG)


def _img_tag(b64: str, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:{PLOT_MIME};base64,{b64}">'


def _col(faces: pa.Table, name: str) -> list[Any]:
    return faces.column(name).to_pylist() if name in faces.column_names else [None] * faces.num_rows


def similarity_plot(counts: PlotCounts, th: PolicyThresholds) -> str:
    """Histograms of decision scores per status, albums and ID cards side by side, with the
    thresholds the decisions were taken against drawn as vertical lines (base64 SVG)."""
    lines = {
        "album": [("attach", th.attach), ("outlier", th.outlier), ("merge", th.merge)],
        "idcard": [("accept", th.idcard_accept), ("review", th.idcard_review)],
    }
    panels = []
    for kind in KINDS:
        series = []
        for st in STATUS_ORDER:
            n, hist = counts.sim.get((kind, st.value), (0, np.zeros(len(SIM_EDGES) - 1)))
            if n:
                series.append(svgplot.Series(f"{st} ({n})", hist, STATUS_COLOURS[st]))
        # Thresholds are named in the legend, each its own line style: labels written beside
        # the lines overlapped where two thresholds are close (attach 0.50, merge 0.55). The
        # legend sits beside the plot: inside, it covered the bars at low similarity.
        vlines = [
            svgplot.VLine(f"{name} {x:.2f}", x, style)
            for (name, x), style in zip(lines[kind], THRESHOLD_STYLES, strict=False)
        ]
        panels.append(
            svgplot.Panel(
                SIM_EDGES,
                series,
                vlines,
                title=f"{kind}: similarity behind each decision",
                xlabel="cosine similarity",
                ylabel="faces",
                empty_text=f"no {kind} decisions this run",
                width=560,
                height=310,
            )
        )
    return svgplot.b64(svgplot.figure(panels))


def identity_size_plot(counts: PlotCounts) -> str:
    """Histogram of faces per identity (auto and human faces; base64 SVG)."""
    sizes = counts.sizes
    series = []
    if sizes.size:
        edges = np.arange(1, sizes.max() + 2) - 0.5
        hist = np.bincount(sizes, minlength=int(sizes.max()) + 1)[1:]
        series.append(svgplot.Series("identities", hist, "tab:green", alpha=0.8))
    else:
        edges = np.array([0.5, 1.5])
    panel = svgplot.Panel(
        edges,
        series,
        title=f"identity sizes ({sizes.size} identities)",
        xlabel="faces per identity",
        ylabel="identities",
        legend=False,
        width=460,
        height=290,
    )
    return svgplot.b64(svgplot.figure([panel]))


def quality_plot(counts: PlotCounts) -> str:
    """Quality score distribution per status (base64 SVG)."""
    series = []
    for st in STATUS_ORDER:
        n, hist = counts.quality.get(st.value, (0, np.zeros(len(QUALITY_EDGES) - 1)))
        if n:
            series.append(svgplot.Series(str(st), hist, STATUS_COLOURS[st]))
    panel = svgplot.Panel(
        QUALITY_EDGES,
        series,
        title="face quality",
        xlabel="quality",
        ylabel="faces",
        width=560,
        height=290,
    )
    return svgplot.b64(svgplot.figure([panel]))


def _crop_image(jpeg: bytes | None, privacy: str) -> Image.Image:
    if not jpeg:
        return Image.new("RGB", (112, 112), (40, 40, 40))
    im = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((112, 112))
    if privacy == "blur":
        # Pixelate then blur: at 8x8 effective resolution no face is recognisable.
        im = im.resize((8, 8), Image.Resampling.BILINEAR).resize(
            (112, 112), Image.Resampling.NEAREST
        )
        im = im.filter(ImageFilter.GaussianBlur(6))
    return im


def contact_sheet(crops: Sequence[bytes | None], privacy: str, cols: int = 8) -> str | None:
    """A grid of face crops as base64 PNG (``None`` for no crops or ``privacy="omit"``)."""
    if privacy not in PRIVACY_MODES:
        raise ValueError(f"privacy must be one of {PRIVACY_MODES}, got {privacy!r}")
    if privacy == "omit" or not crops:
        return None
    rows = (len(crops) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * 114, rows * 114), (255, 255, 255))
    for i, jpeg in enumerate(crops):
        sheet.paste(_crop_image(jpeg, privacy), ((i % cols) * 114 + 1, (i // cols) * 114 + 1))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def eval_table_rows(evaluation: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Flatten ``{labeller: {section: {metric: value}}}`` into (header, rows) for a table."""
    labellers = list(evaluation)
    keys: list[tuple[str, str]] = []
    for lab in labellers:
        for section, figures in evaluation[lab].items():
            for metric in figures:
                if (section, metric) not in keys:
                    keys.append((section, metric))
    rows = [
        [f"{s}.{m}", *(evaluation[lab].get(s, {}).get(m, "") for lab in labellers)] for s, m in keys
    ]
    return ["figure", *labellers], rows


# The figures `faceloop eval` leads with, faceloop beside the anchor: (section, metric, label,
# higher is better).
HEADLINE: tuple[tuple[str, str, str, bool], ...] = (
    ("albums", "pairwise_precision", "albums: pairwise precision", True),
    ("albums", "pairwise_recall", "albums: pairwise recall", True),
    ("albums", "coverage", "albums: coverage (auto-labelled)", True),
    ("albums", "coverage_recurring", "albums: coverage of people seen >= 2x", True),
    ("idcards", "tar", "ID: genuine accepted (TAR)", True),
    ("idcards", "genuine_accepted", "ID: genuine accepted (pairs)", True),
    ("idcards", "far", "ID: impostors accepted (FAR)", False),
    ("idcards", "impostors_accepted", "ID: impostors accepted (pairs)", False),
    ("idcards_cross", "far", "ID: cross-match impostors over the threshold (FAR)", False),
    ("idcards_cross", "accepted", "ID: cross-match impostors over the threshold", False),
    ("claims", "caught", "ID: duplicate claims caught (subjects)", True),
    ("claims", "false", "ID: false duplicate claims (subjects)", False),
)


def headline_rows(evaluation: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The headline figures as (header, rows): figure, faceloop, anchor, and whether faceloop
    is ``better``, ``equal`` or ``WORSE`` than the anchor on it (``-`` without an anchor)."""
    fl = evaluation.get("faceloop", {})
    an = evaluation.get("baseline")
    rows: list[list[Any]] = []
    for section, metric, label, higher in HEADLINE:
        a = fl.get(section, {}).get(metric)
        if a is None:
            continue
        b = an.get(section, {}).get(metric) if an else None
        if b is None:
            verdict = "-"
        elif abs(a - b) < 1e-12:
            verdict = "equal"
        else:
            verdict = "better" if (a > b) == higher else "WORSE"
        rows.append([label, a, "" if b is None else b, verdict])
    return ["figure", "faceloop", "anchor", "faceloop vs anchor"], rows


def review_rows(
    evaluation: Mapping[str, Any], reviewed: Mapping[str, Any]
) -> tuple[list[str], list[list[Any]]]:
    """The headline figures of faceloop's automatic labels beside the same figures after one
    review round (``reviewed``: {"albums": ..., "idcards": ...}), as (header, rows)."""
    fl = evaluation.get("faceloop", {})
    rows: list[list[Any]] = []
    for section, metric, label, _ in HEADLINE:
        if section == "claims":  # a claim answered by a person is no longer one: not comparable
            continue
        a = fl.get(section, {}).get(metric)
        b = reviewed.get(section, {}).get(metric)
        if a is not None and b is not None:
            # After review, coverage counts the faces people labelled too.
            rows.append([label.replace(" (auto-labelled)", " (labelled)"), a, b])
    return ["figure", "automatic", "after review"], rows


CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left;"
    "vertical-align:top} img.plot{max-width:100%} h2{border-bottom:1px solid #ddd}"
    "td.n{text-align:right} tr.total td{font-weight:bold}"
    ".sheet{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:1em}"
    "figure{margin:0;width:116px;font-size:11px;line-height:1.25}"
    "figure img{width:112px;height:112px;border:2px solid #999;display:block}"
    "figcaption{overflow-wrap:anywhere}"
    + "".join(
        f"figure.{s} img{{border-color:{c}}}"
        for s, c in (
            ("auto", "#2ca02c"),
            ("human", "#1f77b4"),
            ("review", "#ff7f0e"),
            ("rejected", "#d62728"),
        )
    )
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return fmt_float(v)
    return str(v)


def fmt_float(v: float) -> str:
    """Four decimals; a non-zero share below 0.001 (a false-accept rate) in powers of ten,
    where four decimals would print it as 0."""
    return f"{v:.1e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"


def _flat_rows(key: str, value: Any) -> list[list[Any]]:
    """A nested value as readable (item, value) rows: dicts become ``parent: child`` rows, a
    list of dicts one row per element (``models 1``) with ``k: v`` pairs, other lists joined."""
    if isinstance(value, Mapping):
        rows: list[list[Any]] = []
        for k, v in value.items():
            rows += _flat_rows(f"{key}: {k}" if key else str(k), v)
        return rows
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Mapping) for v in value):
            return [
                [f"{key} {i + 1}", ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())]
                for i, v in enumerate(value)
            ]
        return [[key, ", ".join(_fmt(v) for v in value) or "-"]]
    return [[key, "-" if value is None else value]]


def _summary_rows(summary: RunSummary | Mapping[str, Any]) -> list[list[Any]]:
    """(item, value) rows of a run summary: a refresh's :class:`RunSummary` in prose, or any
    mapping (``faceloop eval`` passes its own) flattened; never a Python dict printed."""
    if isinstance(summary, RunSummary):
        rows = [["store", summary.store], *map(list, summary.rows())]
        rows += [[f"seconds: {k.removesuffix('_s')}", v] for k, v in summary.timings.items()]
        if summary.dataset:
            d = summary.dataset
            rows.append(
                [
                    "dataset",
                    f"{d.name} v{d.version}: {d.num_rows} faces, {d.num_classes} identities",
                ]
            )
        rows += _flat_rows("model", summary.models)
        for k in ("review", "report", "record"):
            if getattr(summary, k):
                rows.append([k, getattr(summary, k)])
        return rows
    return _flat_rows("", summary)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str], cls: str = "") -> str:
    def cell(v: Any) -> str:
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        return f"<td class='n'>{_fmt(v)}</td>" if num else f"<td>{html.escape(_fmt(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        ("<tr class='total'>" if str(r[0]).startswith("all ") else "<tr>")
        + "".join(cell(v) for v in r)
        + "</tr>"
        for r in rows
    )
    return f"<table{f' class={cls!r}' if cls else ''}><tr>{head}</tr>{body}</table>"


def face_status_counts(faces: pa.Table) -> dict[str, int]:
    """Faces per status, and ``"all"``: what the status table shows of a faces table."""
    import pyarrow.compute as pc

    out = {"all": faces.num_rows}
    status = faces.column("status") if "status" in faces.column_names else None
    for st in STATUS_ORDER:
        hit = pc.sum(pc.equal(status, st.value)).as_py() if status is not None else 0
        out[st.value] = int(hit or 0)
    return out


def status_rows(faces: pa.Table | Mapping[str, int], images: pa.Table | None) -> list[list[Any]]:
    """(status, faces, images) rows and a total: faces by face status (or those counts,
    :func:`face_status_counts`), images by image status. ``quarantined`` counts both tables,
    as :class:`tasks.summary.StoreTotals` does."""
    fs = face_status_counts(faces) if isinstance(faces, pa.Table) else faces
    ims = _col(images, "status") if images is not None else []
    rows: list[list[Any]] = [[str(s), fs.get(s.value, 0), ""] for s in STATUS_ORDER]
    rows[-1][2] = ims.count(ImageStatus.QUARANTINED)
    rows.append(["no face (images)", "", ims.count(ImageStatus.NO_FACE)])
    rows.append(["with faces (images)", "", ims.count(ImageStatus.OK)])
    rows.append(["all", fs.get("all", 0), len(ims)])
    rows[-1][0] = "all faces / images"
    return rows


def quarantined_count(faces: pa.Table | Mapping[str, int], images: pa.Table | None) -> int:
    """Quarantined faces plus quarantined images: the ``quarantined`` of the run totals."""
    fs = face_status_counts(faces) if isinstance(faces, pa.Table) else faces
    ims = _col(images, "status") if images is not None else []
    return fs.get(Status.QUARANTINED.value, 0) + ims.count(ImageStatus.QUARANTINED)


SubjectLabel = Callable[[str], str]


def report_labeller() -> SubjectLabel:
    """ID-card subjects named by a key of this report alone (a store's report names them by
    the store's keyed pseudonym instead, :func:`_store_report`): a plain hash of a subject id
    (a name, an ID number) let anyone holding the report confirm a guess."""
    key = secrets.token_bytes(32)
    return lambda group: "subject #" + hmac.new(key, group.encode(), "sha256").hexdigest()[:8]


def _where(kind: str | None, group: str | None, label: SubjectLabel) -> str:
    """A source group as the report shows it: album names as they are, ID-card subjects by
    ``label`` (a subject id names a person)."""
    if not group:
        return ""
    if kind == "idcard":
        return label(group)
    return group


# A URI or absolute path inside a reason runs to the end of its check (``; `` ends one); paths
# may hold spaces ("/photos/Jane Doe/a.jpg"), so everything up to the last "/" goes. An absolute
# path starts a reason or follows a space, a quote, "(" or "=": a relative path's inner "/"
# ("'Trip (2019)/day 1/a.jpg' is not <album_id>/<image>") is no start of one.
_PATH = re.compile(r"(?:[a-z][a-z0-9+.-]*://|(?:^|(?<=[\s'\"(=]))/)[^;]*/([^/;]+)")


def _strip_paths(text: str) -> str:
    """Paths and URIs inside a reason reduced to their basename (``duplicate_content: same
    bytes as /home/x/a.jpg`` -> ``... same bytes as a.jpg``)."""
    return _PATH.sub(r"\1", text)


def quarantined_rows(
    images: pa.Table | None, run_id: str | None = None, label: SubjectLabel | None = None
) -> list[list[Any]]:
    """(run, file, source, reason code, reason) of each quarantined image, the run's own first
    (``run_id``: "this run", else "earlier"; a store's table is cut at MAX_QUARANTINED_ROWS, and
    sorted by reason alone it left out the files a run had just quarantined); the file by its
    basename (see the module docstring for why); an ID-card subject by ``label``
    (:func:`report_labeller`), in its reason too."""
    if images is None:
        return []
    label = label or report_labeller()
    rows = []
    for r in images.to_pylist():
        if r.get("status") != ImageStatus.QUARANTINED:
            continue
        uri = str(r.get("image_uri") or "")
        kind, group = r.get("source_kind"), r.get("source_group")
        reason = _strip_paths(str(r.get("reason") or ""))
        if kind == "idcard" and group:
            reason = reason.replace(str(group), _where(kind, group, label))
        rows.append(
            [
                "this run" if run_id is not None and r.get("run_id") == run_id else "earlier",
                uri.rstrip("/").rsplit("/", 1)[-1] or "?",
                " ".join(x for x in (kind, _where(kind, group, label)) if x),
                row_reason_code(r) or "?",
                reason,
            ]
        )
    return sorted(rows, key=lambda x: (x[0] != "this run", x[3], x[2], x[1]))


def _crop_jpeg_b64(jpeg: bytes | None, privacy: str) -> str:
    buf = io.BytesIO()
    _crop_image(jpeg, privacy).save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


Sheet = tuple[str, int, list[dict[str, Any]]]


def sheet_size(sample_per_status: int) -> int:
    """Crops shown per identity: ``sample_per_status`` capped at 12."""
    return max(1, min(sample_per_status, UNNAMED_KEEP))


def sheet_choice(
    counts: Mapping[str, tuple[int, int]], max_identities: int = MAX_IDENTITIES
) -> list[str]:
    """The identities whose sheets are shown, from (faces in doubt, faces) per identity:
    the most doubtful first, then the largest; faces without one ("") last."""
    named = sorted((k for k in counts if k), key=lambda k: (-counts[k][0], -counts[k][1], k))
    return [*named[:max_identities], *([""] if "" in counts else [])]


def sample_sheets(
    shown: Sequence[str],
    sizes: Mapping[str, int],
    rows: pa.Table,
    per_identity: int,
    seed: int = 0,
) -> list[Sheet]:
    """Per identity of ``shown``: (identity, its face count, sampled rows). ``rows`` holds
    the faces of the shown identities that are not quarantined, in the faces table's order
    (for faces without an identity, at least the ``per_identity`` lowest-scored in doubt and
    every other one); each sheet shows its doubtful faces first (lowest score first), then a
    seeded sample of the rest."""
    import pyarrow.compute as pc

    groups: dict[str, list[dict[str, Any]]] = {k: [] for k in shown}
    ident_col = pc.fill_null(rows.column("identity_id"), "")
    picked = rows.filter(pc.is_in(ident_col, value_set=pa.array(list(shown), pa.string())))
    for r in picked.to_pylist():
        groups[r.get("identity_id") or ""].append(r)
    rng = np.random.default_rng(seed)

    def doubt(r: Mapping[str, Any]) -> bool:
        return r.get("status") != Status.AUTO

    out = []
    for ident in shown:
        members = groups[ident]
        doubtful = sorted(
            (r for r in members if doubt(r)), key=lambda r: (r.get("score") or 0.0, r["face_id"])
        )
        rest = [r for r in members if not doubt(r)]
        k = max(0, per_identity - len(doubtful))
        pick = [rest[i] for i in sorted(rng.choice(len(rest), min(k, len(rest)), replace=False))]
        out.append((ident, sizes[ident], (doubtful + pick)[:per_identity]))
    return out


def identity_sheets(
    faces: pa.Table,
    privacy: str,
    per_identity: int = 8,
    max_identities: int = MAX_IDENTITIES,
    seed: int = 0,
) -> list[Sheet]:
    """Per identity: (identity, its face count, sampled crops) for the contact sheets.

    Identities with faces in doubt (review, rejected, human) come first, then the largest; each
    shows its doubtful faces first (lowest score first), then a seeded sample of the rest.
    Faces without an identity form one last sheet. Quarantined faces are never shown."""
    import pyarrow.compute as pc

    keep = [c for c in (*REPORT_COLUMNS, "source_group") if c in faces.column_names]
    t = faces.select(keep)
    if "status" in t.column_names:
        t = t.filter(pc.fill_null(pc.not_equal(t.column("status"), Status.QUARANTINED.value), True))
    if "identity_id" not in t.column_names:
        t = t.append_column("identity_id", pa.nulls(t.num_rows, pa.string()))
    ident_col = pc.fill_null(t.column("identity_id"), "")
    doubt_col = (
        pc.fill_null(pc.not_equal(t.column("status"), Status.AUTO.value), True)
        if "status" in t.column_names
        else pa.array([True] * t.num_rows)
    )
    # The identities shown are chosen on counts (in Arrow): only their rows become dicts, so
    # a store of millions of faces is never one Python object per face here.
    per = (
        pa.table({"i": ident_col, "d": pc.cast(doubt_col, pa.int64())})
        .group_by("i")
        .aggregate([("d", "sum"), ("d", "count")])
    )
    counts = {
        k: (int(d), int(n))
        for k, d, n in zip(
            per.column("i").to_pylist(),
            per.column("d_sum").to_pylist(),
            per.column("d_count").to_pylist(),
            strict=True,
        )
    }
    shown = sheet_choice(counts, max_identities)
    return sample_sheets(shown, {k: counts[k][1] for k in shown}, t, per_identity, seed)


def _sheet_html(
    ident: str, n: int, sample: Sequence[Mapping[str, Any]], privacy: str, label: SubjectLabel
) -> str:
    if ident and any(r.get("source_kind") == "idcard" for r in sample):
        # An ID subject's identity is its subject id, which names a person: shown as the
        # quarantine table shows subjects (_where), never beside the person's faces.
        ident = _where("idcard", ident, label)
    title = f"{ident} ({n} faces)" if ident else f"no identity ({n} faces)"
    figs = []
    for r in sample:
        score = r.get("score")
        code = row_reason_code(r) or str(r.get("status"))
        cap = (
            f"{html.escape(ident or '-')}<br>{html.escape(str(r.get('status')))}: "
            f"{html.escape(code)}<br>score {'-' if score is None else f'{score:.2f}'}"
        )
        alt = f"crop {r['face_id']}"
        figs.append(
            f"<figure class='{html.escape(str(r.get('status')))}'><img alt='{html.escape(alt)}' "
            f"src='data:image/jpeg;base64,{_crop_jpeg_b64(r.get('aligned_jpeg'), privacy)}'>"
            f"<figcaption>{cap}</figcaption></figure>"
        )
    return (
        f"<h3 class='identity'>{html.escape(title)}</h3>"
        f"<div class='sheet' data-identity='{html.escape(ident)}'>{''.join(figs)}</div>"
    )


def render_report(
    faces: pa.Table | None,
    thresholds: PolicyThresholds,
    *,
    face_counts: Mapping[str, int] | None = None,
    sheets: Sequence[Sheet] | None = None,
    title: str = "faceloop run",
    privacy: str = "blur",
    sample_per_status: int = 24,
    seed: int = 0,
    evaluation: Mapping[str, Any] | None = None,
    summary: RunSummary | Mapping[str, Any] | None = None,
    images: pa.Table | None = None,
    crops: CropLoader | None = None,
    plots: Sequence[tuple[str, str]] | None = None,
    subject_label: SubjectLabel | None = None,
) -> str:
    """The report as one HTML string. ``faces`` needs the columns in :data:`REPORT_COLUMNS`
    (missing ones are treated as empty); ``images`` (the latest row per image, columns
    :data:`IMAGE_COLUMNS`) adds image counts and the quarantined images. Sampling for contact
    sheets is seeded; ``sample_per_status`` caps the crops shown per identity (at most 12).
    ``crops``: where the contact sheets' crops come from when ``faces`` has no
    ``aligned_jpeg`` (only the sampled faces' are read); ``plots``: :func:`plots_of` of the
    same faces, when the caller has them already. Without ``faces`` (a store's report from its
    per-file summaries), ``face_counts`` (:func:`face_status_counts`), ``plots`` and ``sheets``
    (:func:`sample_sheets`) stand for it. ``subject_label`` names ID-card subjects (default:
    :func:`report_labeller`, a key of this report alone)."""
    if privacy not in PRIVACY_MODES:
        raise ValueError(f"privacy must be one of {PRIVACY_MODES}, got {privacy!r}")
    label = subject_label or report_labeller()
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    if faces is None and (face_counts is None or plots is None or sheets is None):
        raise ValueError("a report without faces needs face_counts, plots and sheets")
    counted = face_counts if face_counts is not None else face_status_counts(faces)
    if summary:
        parts.append("<h2>Run</h2>" + _table(_summary_rows(summary), ["item", "value"]))
    parts.append(
        "<h2>Faces and images by status</h2>"
        + _table(status_rows(counted, images), ["status", "faces", "images"], "status")
        + f"<p>quarantined (faces + images, as in the run totals): "
        f"<b id='quarantined-total'>{quarantined_count(counted, images)}</b></p>"
    )
    parts.append(
        "<h2>Thresholds</h2>"
        + _table([[k, v] for k, v in thresholds.model_dump().items()], ["threshold", "cosine"])
    )
    if evaluation:
        hh, hrows = headline_rows(evaluation)
        header, rows = eval_table_rows(evaluation)
        parts.append(
            "<h2 id='evaluation'>Evaluation against the truth</h2>"
            + _table(hrows, hh)
            + "<h3>All figures</h3>"
            + _table(rows, header)
        )
    sim, sizes, quality = [b64 for _, b64 in (plots or plots_of(faces, thresholds))]
    parts.append("<h2>Similarity behind decisions</h2>" + _img_tag(sim, "similarity histograms"))
    parts.append(
        "<h2>Identities and quality</h2>"
        + _img_tag(sizes, "identity sizes")
        + _img_tag(quality, "quality")
    )
    parts.append(
        f"<h2>Contact sheets by identity</h2><p>privacy: {html.escape(privacy)}. Under each "
        "crop: identity, status: reason code, score (similarity behind the decision). Border: "
        "green auto, blue human, orange review, red rejected. Identities with faces in doubt "
        "first.</p>"
    )
    if privacy == "omit":
        parts.append("<p>Face crops omitted (privacy setting).</p>")
    else:
        if sheets is None:
            assert faces is not None
            sheets = identity_sheets(faces, privacy, sheet_size(sample_per_status), seed=seed)
        if crops is not None and (faces is None or "aligned_jpeg" not in faces.column_names):
            shown = [r for _, _, sample in sheets for r in sample]
            jpegs = crops(shown) if shown else {}
            for r in shown:
                r["aligned_jpeg"] = jpegs.get(r["face_id"])
        for ident, n, sample in sheets:
            parts.append(_sheet_html(ident, n, sample, privacy, label))
    run_id = summary.run_id if isinstance(summary, RunSummary) else (summary or {}).get("run_id")
    q_rows = quarantined_rows(images, run_id, label)
    mine = sum(r[0] == "this run" for r in q_rows)
    parts.append(
        f"<h2 id='quarantined'>Quarantined images ({len(q_rows)}"
        + (f"; {mine} of this run" if run_id is not None else "")
        + ")</h2>"
    )
    if q_rows:
        more = len(q_rows) - MAX_QUARANTINED_ROWS
        parts.append(
            "<p>File basenames only; no crops of quarantined images. This run's first.</p>"
            + _table(
                q_rows[:MAX_QUARANTINED_ROWS],
                ["run", "file", "source", "code", "reason"],
                "quarantined",
            )
            + (f"<p>{more} more in the images table.</p>" if more > 0 else "")
        )
    else:
        parts.append("<p>None.</p>" if images is not None else "<p>Images table not read.</p>")
    parts.append("</body></html>")
    return "".join(parts)


def plots_of(faces: pa.Table | PlotCounts, thresholds: PolicyThresholds) -> list[tuple[str, str]]:
    """The report's plots of ``faces`` (or of their :class:`PlotCounts`) as ``(title, base64
    PNG)``: histograms of similarities, identity sizes and quality. They hold no face, so they
    may travel into a Prefect artifact (contact sheets never do)."""
    counts = faces if isinstance(faces, PlotCounts) else plot_counts(faces)
    return [
        ("similarity behind each decision", similarity_plot(counts, thresholds)),
        ("identity sizes", identity_size_plot(counts)),
        ("face quality", quality_plot(counts)),
    ]


def report_markdown(summary: RunSummary, uri: str, plots: Sequence[tuple[str, str]] = ()) -> str:
    """The report's figures as markdown, for a Prefect artifact (the UI renders markdown; it
    cannot open a ``file://`` or ``s3://`` report): store totals, this run's counts, stage
    timings, the dataset published, the plots inline (PNG data URIs, which the Prefect UI
    renders), and the report's location as text."""
    t = summary.totals
    lines = [
        f"# faceloop run {summary.run_id}",
        "",
        "| faces | auto | human | review | rejected | quarantined (faces + images) | "
        "identities | images | images without a face |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {t.faces} | {t.auto} | {t.human} | {t.review} | {t.rejected} | {t.quarantined} | "
        f"{t.identities} | {t.images} | {t.images_without_face} |",
        "",
        "| this run | count |",
        "|---|---:|",
        *(
            f"| {k.removeprefix('this run: ')} | {v} |"
            for k, v in summary.rows()[1:]
            if k.startswith("this run: ")
        ),
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in summary.timings.items()),
        "",
        f"Report (HTML, plots and contact sheets; open it from the machine that holds the "
        f"store): `{uri}`",
    ]
    if summary.review:
        lines += ["", f"Review: {summary.review}"]
    for title, svg in plots:
        lines += ["", f"![{title}](data:{PLOT_MIME};base64,{svg})"]
    return "\n".join(lines)


def write_report(path: str | Path, html_text: str) -> Path:
    """Write the report file (creating folders) and return its path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(html_text, encoding="utf-8")
    log.info("report written to %s", p)
    return p


def _images(store: Any) -> pa.Table:
    """The latest row of every image (what the run totals count)."""
    from storage.tables import latest_images

    return latest_images(store, columns=[*IMAGE_COLUMNS, "reason_code"])


def store_crops(store: Any) -> CropLoader:
    """A :data:`CropLoader` reading the crops of the given faces from their group files only
    (a report samples a few hundred faces: the crops of the rest are never read)."""
    import pyarrow.compute as pc

    from storage.tables import iter_faces

    def load(rows: Sequence[Mapping[str, Any]]) -> dict[str, bytes | None]:
        wanted = {r["face_id"] for r in rows}
        pairs = {(r.get("source_kind"), r.get("source_group")) for r in rows}
        groups = {(str(k), str(g)) for k, g in pairs if k and g}
        out: dict[str, bytes | None] = {}
        # Their group files; a face whose group is not known (or not where its key says) is
        # looked for file by file, one file in memory at a time.
        known = len(groups) == len(pairs)
        value_set = pa.array(sorted(wanted), pa.string())
        for t in iter_faces(store, ["face_id", "aligned_jpeg"], groups=groups if known else None):
            t = t.filter(pc.is_in(t.column("face_id"), value_set=value_set))
            ids, jpegs = t.column("face_id").to_pylist(), t.column("aligned_jpeg").to_pylist()
            out.update(zip(ids, jpegs, strict=True))
        if known and len(out) < len(wanted):
            return load([{"face_id": f} for f in wanted])
        return out

    return load


def _store_report(
    store: Any,
    thresholds: PolicyThresholds,
    *,
    title: str,
    privacy: str,
    sample_per_status: int,
    evaluation: Mapping[str, Any] | None,
    summary: RunSummary | Mapping[str, Any] | None,
    seed: int = 0,
) -> tuple[str, list[tuple[str, str]]]:
    """The report of ``store``'s faces table and its plots, from the per-file summaries
    (:func:`tasks.summary.group_summaries`: only files written since they were last taken are
    read) plus the faces files that hold the identities shown and the crops shown."""
    import pyarrow.compute as pc

    from storage.secret import pseudonym
    from storage.tables import read_faces_file
    from tasks.publish import SUBJECT_PREFIX
    from tasks.summary import (
        SHEET_ROW,
        files_holding,
        group_summaries,
        sheet_counts,
        summary_plot_counts,
        summary_status_counts,
        unnamed_rows,
    )

    groups = group_summaries(store)
    face_counts = summary_status_counts(groups)
    plots = plots_of(summary_plot_counts(groups), thresholds)
    sheets: list[Sheet] = []
    if privacy != "omit":
        counts = sheet_counts(groups)
        shown = sheet_choice(counts)
        named = [k for k in shown if k]
        parts = [
            read_faces_file(store, rel, SHEET_ROW.names) for rel in files_holding(groups, named)
        ]
        rows = pa.concat_tables(parts).cast(SHEET_ROW) if parts else SHEET_ROW.empty_table()
        rows = rows.filter(
            pc.and_(
                pc.is_in(rows.column("identity_id"), value_set=pa.array(named, pa.string())),
                pc.fill_null(pc.not_equal(rows.column("status"), Status.QUARANTINED.value), True),
            )
        )
        if "" in shown:
            rows = pa.concat_tables([rows, unnamed_rows(groups)])
        sizes = {k: counts[k][1] for k in shown}
        sheets = sample_sheets(shown, sizes, rows, sheet_size(sample_per_status), seed)
    text = render_report(
        None,
        thresholds,
        face_counts=face_counts,
        sheets=sheets,
        title=title,
        privacy=privacy,
        sample_per_status=sample_per_status,
        evaluation=evaluation,
        summary=summary,
        images=_images(store),
        crops=store_crops(store),
        subject_label=lambda group: SUBJECT_PREFIX + pseudonym(store, "subject", group),
        plots=plots,
    )
    return text, plots


def report_for_store(
    store_root: str,
    thresholds: PolicyThresholds,
    out_path: str | Path,
    *,
    privacy: str = "blur",
    sample_per_status: int = 24,
    evaluation: Mapping[str, Any] | None = None,
    summary: RunSummary | Mapping[str, Any] | None = None,
    title: str = "faceloop run",
) -> Path:
    """Read the faces table of the store at ``store_root`` and write its report to
    ``out_path``. This is what ``faceloop eval`` calls at the end of a run."""
    from storage.objectstore import open_store

    text, _ = _store_report(
        open_store(store_root),
        thresholds,
        title=title,
        privacy=privacy,
        sample_per_status=sample_per_status,
        evaluation=evaluation,
        summary=summary,
    )
    return write_report(out_path, text)


def run_report(
    settings: Any,
    run_id: str,
    evaluation: Mapping[str, Any] | None = None,
    summary: RunSummary | Mapping[str, Any] | None = None,
) -> str:
    """:func:`run_report_and_plots`'s URI."""
    return run_report_and_plots(settings, run_id, evaluation, summary)[0]


def run_report_and_plots(
    settings: Any,
    run_id: str,
    evaluation: Mapping[str, Any] | None = None,
    summary: RunSummary | Mapping[str, Any] | None = None,
) -> tuple[str, list[tuple[str, str]]]:
    """Render the report of the store's current faces table and write it to
    ``<store>/reports/<run_id>.html`` (local or S3). Returns its URI (what the refresh flow
    links as a Prefect artifact) and its plots (:func:`plots_of`: the artifact shows them
    too). Respects ``settings.report.privacy``."""
    from storage.objectstore import open_store

    store = open_store(settings.store)
    text, plots = _store_report(
        store,
        settings.thresholds,
        title=f"faceloop run {run_id}",
        privacy=settings.report.privacy,
        sample_per_status=settings.report.sample_per_status,
        evaluation=evaluation,
        summary=summary,
    )
    rel = layout.run_report(run_id)
    store.write_bytes(rel, text.encode("utf-8"))
    log.info("report written to %s", store.uri(rel))
    return store.uri(rel), plots
