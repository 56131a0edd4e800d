"""The HTML report renders, parses, carries its plots, and honours the privacy flag."""

import base64
import io
from html.parser import HTMLParser

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from evaluation.report import contact_sheet, render_report, report_for_store
from faceloop.config import PolicyThresholds
from faceloop.schema import FACES_SCHEMA


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.h2 = [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


def _crop(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    _, buf = cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    return buf.tobytes()


def _faces(n: int = 30) -> pa.Table:
    rng = np.random.default_rng(0)
    statuses = ["auto", "review", "rejected"]
    rows = {
        "face_id": [f"f{i}" for i in range(n)],
        "source_kind": ["album" if i % 3 else "idcard" for i in range(n)],
        "role": ["album"] * n,
        "status": [statuses[i % 3] for i in range(n)],
        "reason": ["x"] * n,
        "score": rng.uniform(0, 1, n).astype(np.float32).tolist(),
        "quality": rng.uniform(0, 1, n).astype(np.float32).tolist(),
        "identity_id": [f"id{i % 4}" if i % 3 == 0 else None for i in range(n)],
        "aligned_jpeg": [_crop(i) for i in range(n)],
    }
    return pa.table(rows)


def _parse(text: str) -> _Collect:
    p = _Collect()
    p.feed(text)
    p.close()
    return p


def _decode(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_report_parses_and_has_plots():
    ev = {
        "faceloop": {"albums": {"pairwise_precision": 0.99}},
        "baseline": {"albums": {"pairwise_precision": 0.9}},
    }
    text = render_report(_faces(), PolicyThresholds(), privacy="none", evaluation=ev)
    p = _parse(text)
    alts = [i["alt"] for i in p.imgs]
    for alt in (
        "similarity histograms",
        "identity sizes",
        "quality",
        "contact sheet auto",
        "contact sheet review",
        "contact sheet rejected",
    ):
        assert alt in alts
    for i in p.imgs:
        im = _decode(i["src"])
        assert im.width > 50 and im.height > 50
    assert "Evaluation against the truth" in p.h2
    assert "0.9900" in text


def test_privacy_omit_has_no_face_sheets():
    p = _parse(render_report(_faces(), PolicyThresholds(), privacy="omit"))
    assert not [i for i in p.imgs if i["alt"].startswith("contact sheet")]
    assert "Evaluation against the truth" not in p.h2


def test_blur_removes_detail():
    crops = [_crop(1)]
    sharp = np.asarray(
        _decode("data:image/png;base64," + contact_sheet(crops, "none", cols=1)), float
    )
    blurred = np.asarray(
        _decode("data:image/png;base64," + contact_sheet(crops, "blur", cols=1)), float
    )

    # high-frequency energy (noise crop) almost gone after blurring
    def hf(a):
        return np.abs(np.diff(a, axis=0)).mean()

    assert hf(blurred) < 0.1 * hf(sharp)
    with pytest.raises(ValueError):
        contact_sheet(crops, "maybe")


def test_report_for_store_reads_faces_table(tmp_path):
    faces = _faces(9)
    full = {
        name: faces.column(name)
        if name in faces.column_names
        else pa.nulls(9, FACES_SCHEMA.field(name).type)
        for name in FACES_SCHEMA.names
    }
    import pyarrow.parquet as pq

    (tmp_path / "tables" / "faces" / "album").mkdir(parents=True)
    pq.write_table(pa.table(full, schema=FACES_SCHEMA), tmp_path / "tables/faces/album/g.parquet")
    out = report_for_store(str(tmp_path), PolicyThresholds(), tmp_path / "r/report.html")
    assert "contact sheet auto" in out.read_text()


def test_run_report_writes_into_store(tmp_path):
    import pyarrow.parquet as pq

    from evaluation.report import run_report
    from faceloop.config import load_settings

    faces = _faces(6)
    full = {
        n: faces.column(n) if n in faces.column_names else pa.nulls(6, FACES_SCHEMA.field(n).type)
        for n in FACES_SCHEMA.names
    }
    (tmp_path / "tables" / "faces" / "album").mkdir(parents=True)
    pq.write_table(pa.table(full, schema=FACES_SCHEMA), tmp_path / "tables/faces/album/g.parquet")
    settings = load_settings(None, store=str(tmp_path), report={"privacy": "omit"})
    uri = run_report(settings, "r1")
    text = (tmp_path / "reports" / "r1.html").read_text()
    assert uri.endswith("reports/r1.html")
    assert "contact sheet" not in text and "identity sizes" in text
