"""HTML run report: one self-contained file (plots as base64 PNGs) per refresh.

Sections: similarity histograms of accepted / reviewed / rejected decisions against the active
thresholds (album and ID-card decisions separately, since their scores mean different things),
identity-size distribution, quality distribution, a contact sheet per status, and, when a truth
is known (``faceloop eval``), the evaluation figures.

Privacy: face crops are biometric data. ``privacy="blur"`` blurs every crop until it is not
recognisable, ``"omit"`` leaves the contact sheets out, ``"none"`` shows crops as stored.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from faceloop.config import PolicyThresholds
from faceloop.vocab import Status
from storage import layout
from tasks.summary import RunSummary

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
)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img_tag(b64: str, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _col(faces: pa.Table, name: str) -> list[Any]:
    return faces.column(name).to_pylist() if name in faces.column_names else [None] * faces.num_rows


def similarity_plot(faces: pa.Table, th: PolicyThresholds) -> str:
    """Histograms of decision scores per status, albums and ID cards side by side, with the
    thresholds the decisions were taken against drawn as vertical lines."""
    kinds, status, score = _col(faces, "source_kind"), _col(faces, "status"), _col(faces, "score")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    lines = {
        "album": [("attach", th.attach), ("outlier", th.outlier), ("merge", th.merge)],
        "idcard": [("accept", th.idcard_accept), ("review", th.idcard_review)],
    }
    bins = np.linspace(-0.2, 1.0, 61)
    for ax, kind in zip(axes, ("album", "idcard"), strict=False):
        for st in STATUS_ORDER:
            vals = [
                s
                for k, t, s in zip(kinds, status, score, strict=False)
                if k == kind and t == st and s is not None
            ]
            if vals:
                ax.hist(
                    vals,
                    bins=bins,
                    alpha=0.55,
                    label=f"{st} ({len(vals)})",
                    color=STATUS_COLOURS[st],
                )
        for name, x in lines[kind]:
            ax.axvline(x, ls="--", lw=1, color="k")
            ax.text(
                x, ax.get_ylim()[1] * 0.95, f" {name} {x:.2f}", fontsize=7, rotation=90, va="top"
            )
        ax.set_title(f"{kind}: similarity behind each decision")
        ax.set_xlabel("cosine similarity")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def identity_size_plot(faces: pa.Table) -> str:
    """Histogram of faces per identity (auto and human faces)."""
    ids = [
        i
        for i, s in zip(_col(faces, "identity_id"), _col(faces, "status"), strict=False)
        if i is not None and s in (Status.AUTO, Status.HUMAN)
    ]
    _, counts = (
        np.unique(np.asarray(ids, dtype=object).astype(str), return_counts=True)
        if ids
        else (None, np.zeros(0))
    )
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if counts.size:
        ax.hist(counts, bins=list(np.arange(1, counts.max() + 2) - 0.5), color="tab:green")
    ax.set_xlabel("faces per identity")
    ax.set_ylabel("identities")
    ax.set_title(f"identity sizes ({counts.size} identities)")
    return _png(fig)


def quality_plot(faces: pa.Table) -> str:
    """Quality score distribution per status."""
    q, status = _col(faces, "quality"), _col(faces, "status")
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for st in STATUS_ORDER:
        vals = [v for v, s in zip(q, status, strict=False) if s == st and v is not None]
        if vals:
            ax.hist(
                vals,
                bins=list(np.linspace(0, 1, 41)),
                alpha=0.55,
                label=st,
                color=STATUS_COLOURS[st],
            )
    ax.set_xlabel("quality")
    ax.set_title("face quality")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _png(fig)


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


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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


CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px} img.plot{max-width:100%}"
    "h2{border-bottom:1px solid #ddd}"
)


def _summary_rows(summary: RunSummary | Mapping[str, Any]) -> list[list[Any]]:
    """(item, value) rows of a run summary: a refresh's :class:`RunSummary` in prose, or any
    mapping (``faceloop eval`` passes its own) item by item."""
    if isinstance(summary, RunSummary):
        rows = [["store", summary.store], *map(list, summary.rows())]
        rows += [[f"seconds: {k}", v] for k, v in summary.timings.items()]
        if summary.review:
            rows.append(["review", summary.review])
        return rows
    return [[k, v] for k, v in summary.items()]


def render_report(
    faces: pa.Table,
    thresholds: PolicyThresholds,
    *,
    title: str = "faceloop run",
    privacy: str = "blur",
    sample_per_status: int = 24,
    seed: int = 0,
    evaluation: Mapping[str, Any] | None = None,
    summary: RunSummary | Mapping[str, Any] | None = None,
) -> str:
    """The report as one HTML string. ``faces`` needs the columns in :data:`REPORT_COLUMNS`
    (missing ones are treated as empty). Sampling for contact sheets is seeded."""
    if privacy not in PRIVACY_MODES:
        raise ValueError(f"privacy must be one of {PRIVACY_MODES}, got {privacy!r}")
    status = _col(faces, "status")
    counts = {s: status.count(s) for s in STATUS_ORDER}
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    if summary:
        parts.append("<h2>Run</h2>" + _table(_summary_rows(summary), ["item", "value"]))
    parts.append(
        "<h2>Faces by status</h2>"
        + _table([[s, counts[s]] for s in STATUS_ORDER], ["status", "faces"])
    )
    parts.append(
        "<h2>Thresholds</h2>"
        + _table([[k, v] for k, v in thresholds.model_dump().items()], ["threshold", "cosine"])
    )
    if evaluation:
        header, rows = eval_table_rows(evaluation)
        parts.append("<h2 id='evaluation'>Evaluation against the truth</h2>" + _table(rows, header))
    parts.append(
        "<h2>Similarity behind decisions</h2>"
        + _img_tag(similarity_plot(faces, thresholds), "similarity histograms")
    )
    parts.append(
        "<h2>Identities and quality</h2>"
        + _img_tag(identity_size_plot(faces), "identity sizes")
        + _img_tag(quality_plot(faces), "quality")
    )
    parts.append(f"<h2>Contact sheets</h2><p>privacy: {html.escape(privacy)}</p>")
    if privacy == "omit":
        parts.append("<p>Face crops omitted (privacy setting).</p>")
    else:
        rng = np.random.default_rng(seed)
        crops = _col(faces, "aligned_jpeg")
        for st in STATUS_ORDER:
            idx = [i for i, s in enumerate(status) if s == st]
            if not idx:
                continue
            pick = sorted(rng.choice(idx, size=min(sample_per_status, len(idx)), replace=False))
            sheet = contact_sheet([crops[i] for i in pick], privacy)
            if sheet:
                parts.append(
                    f"<h3>{st} ({len(idx)} faces, {len(pick)} shown)</h3>"
                    + _img_tag(sheet, f"contact sheet {st}")
                )
    parts.append("</body></html>")
    return "".join(parts)


def write_report(path: str | Path, html_text: str) -> Path:
    """Write the report file (creating folders) and return its path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(html_text, encoding="utf-8")
    log.info("report written to %s", p)
    return p


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
    ``out_path``. This is what a refresh (and ``faceloop eval``) call at the end of a run."""
    from faceloop.schema import FACES_SCHEMA
    from storage.objectstore import open_store

    faces = open_store(store_root).read_parquet(
        layout.FACES, columns=list(REPORT_COLUMNS), schema=FACES_SCHEMA
    )
    text = render_report(
        faces,
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
    """Render the report of the store's current faces table and write it to
    ``<store>/reports/<run_id>.html`` (local or S3). Returns its URI: what the refresh flow
    links as a Prefect artifact. Respects ``settings.report.privacy``."""
    from faceloop.schema import FACES_SCHEMA
    from storage.objectstore import open_store

    store = open_store(settings.store)
    faces = store.read_parquet(layout.FACES, columns=list(REPORT_COLUMNS), schema=FACES_SCHEMA)
    text = render_report(
        faces,
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
    return store.uri(rel)
