"""The HTML report renders, parses, carries its plots, and honours the privacy flag."""

import base64
import hashlib
import io
import xml.etree.ElementTree as ET
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
        "source_kind": ["idcard" if i % 3 == 1 else "album" for i in range(n)],
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
    assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def _svg(src: str) -> ET.Element:
    prefix = "data:image/svg+xml;base64,"
    assert src.startswith(prefix)
    root = ET.fromstring(base64.b64decode(src[len(prefix) :]))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def test_report_parses_and_has_plots():
    ev = {
        "faceloop": {"albums": {"pairwise_precision": 0.99}},
        "baseline": {"albums": {"pairwise_precision": 0.9}},
    }
    text = render_report(_faces(), PolicyThresholds(), privacy="none", evaluation=ev)
    p = _parse(text)
    alts = [i["alt"] for i in p.imgs]
    for alt in ("similarity histograms", "identity sizes", "quality"):
        assert alt in alts
    assert any(a.startswith("crop ") for a in alts)
    for i in p.imgs:
        if i["alt"].startswith("crop "):
            im = _decode(i["src"])
            assert im.width > 50 and im.height > 50
        else:  # the plots: SVG documents
            svg = _svg(i["src"])
            assert float(svg.get("width")) > 50 and float(svg.get("height")) > 50
    assert "Evaluation against the truth" in p.h2
    assert "0.9900" in text


def test_privacy_omit_has_no_face_sheets():
    p = _parse(render_report(_faces(), PolicyThresholds(), privacy="omit"))
    assert not [i for i in p.imgs if i["alt"].startswith("crop ")]
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
    assert "class='sheet'" in out.read_text()


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
    assert "class='sheet'" not in text and "identity sizes" in text


# -- tables and consistency ---------------------------------------------------------------------


def _store(tmp_path, faces: pa.Table, images: list[dict]):
    """A store with ``faces`` in one album group and ``images`` as one run's image rows."""
    from faceloop.schema import IMAGES_SCHEMA
    from storage.objectstore import open_store
    from storage.tables import append_images, write_group

    n = faces.num_rows
    full = {
        c: faces.column(c) if c in faces.column_names else pa.nulls(n, FACES_SCHEMA.field(c).type)
        for c in FACES_SCHEMA.names
    }
    full["source_group"] = pa.array(["album1"] * n)
    full["source_kind"] = pa.array(["album"] * n)
    store = open_store(str(tmp_path / "store"))
    write_group(store, "album", "album1", pa.table(full, schema=FACES_SCHEMA))
    rows = [{c: None for c in IMAGES_SCHEMA.names} | r | {"run_id": "r1"} for r in images]
    append_images(store, "r1", pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
    return store


def _images(n_ok: int = 3, n_q: int = 6) -> list[dict]:
    ok = [
        {"image_uri": f"/home/alice/photos/album1/ok{i}.jpg", "status": "ok"} for i in range(n_ok)
    ]
    q = [
        {
            "image_uri": f"/home/alice/photos/album1/bad{i}.jpg",
            "source_kind": "album",
            "source_group": "album1",
            "status": "quarantined",
            "reason": "not_an_image: cannot identify image file",
            "reason_code": "not_an_image",
        }
        for i in range(n_q)
    ]
    q.append(
        {
            "image_uri": "/home/alice/ids/Jane Doe/live1.png",
            "source_kind": "idcard",
            "source_group": "Jane Doe",
            "status": "quarantined",
            "reason": "duplicate_content: same bytes as /home/alice/ids/Jane Doe/id.png",
            "reason_code": "too_large",
        }
    )
    return ok + q


class _Tables(HTMLParser):
    """Rows of every <table>, by its class."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._cls, self._row, self._cell = "", None, None
        self.figcaptions: list[str] = []
        self._fig = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._cls = a.get("class") or f"t{len(self.tables)}"
            self.tables[self._cls] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "figcaption":
            self._fig = ""
        elif tag == "br" and self._fig is not None:
            self._fig += "|"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._cls].append(self._row)
            self._row = None
        elif tag == "figcaption":
            self.figcaptions.append(self._fig)
            self._fig = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._fig is not None:
            self._fig += data


def _tables(text: str) -> _Tables:
    t = _Tables()
    t.feed(text)
    return t


def test_counts_match_the_run_totals_quarantined_from_both_tables(tmp_path):
    """The reported bug: "Faces by status" said 0 quarantined while the totals said 6."""
    from evaluation.report import run_report
    from faceloop.config import load_settings
    from tasks.summary import store_counts

    store = _store(tmp_path, _faces(9), _images())
    totals = store_counts(store)
    assert totals.quarantined == 7
    settings = load_settings(None, store=store.root, report={"privacy": "blur"})
    run_report(settings, "r1")
    text = store.read_bytes("reports/r1.html").decode()
    rows = {r[0]: r[1:] for r in _tables(text).tables["status"][1:]}
    assert rows["quarantined"] == ["0", "7"]
    assert int(rows["all faces / images"][0]) == totals.faces
    assert int(rows["all faces / images"][1]) == totals.images
    for st in ("auto", "review", "rejected", "human"):
        assert int(rows[st][0]) == getattr(totals, st)
    assert "id='quarantined-total'>7<" in text


def test_quarantined_images_listed_by_basename_without_crops(tmp_path):
    faces = _faces(6)
    status = faces.column("status").to_pylist()
    status[0] = "quarantined"
    faces = faces.set_column(faces.column_names.index("status"), "status", pa.array(status))
    store = _store(tmp_path, faces, _images(n_q=2))
    out = report_for_store(store.root, PolicyThresholds(), tmp_path / "r.html", privacy="blur")
    text = out.read_text()
    rows = _tables(text).tables["quarantined"]
    assert rows[0] == ["run", "file", "source", "code", "reason"]
    files = sorted(r[1] for r in rows[1:])
    assert files == ["bad0.jpg", "bad1.jpg", "live1.png"]
    assert "/home/alice" not in text and "Jane Doe" not in text  # no paths, no subject names
    assert {r[3] for r in rows[1:]} == {"not_an_image", "too_large"}
    assert "crop f0'" not in text  # the quarantined face is not shown
    assert "Quarantined images (3)" in text


def test_a_runs_own_quarantines_come_first(tmp_path):
    """A run that quarantined two files reported "Quarantined images (207)" and "7 more in the
    images table" without either of them: the store's table, sorted by reason, cut at 200."""
    from evaluation.report import MAX_QUARANTINED_ROWS, run_report
    from faceloop.config import load_settings
    from faceloop.schema import IMAGES_SCHEMA
    from storage.tables import append_images

    store = _store(tmp_path, _faces(3), _images(n_q=MAX_QUARANTINED_ROWS + 5))
    new = [
        {c: None for c in IMAGES_SCHEMA.names}
        | {
            "image_uri": f"/in/album1/new{i}.jpg",
            "source_kind": "album",
            "source_group": "album1",
            "status": "quarantined",
            "reason": "unsupported_format: TIFF",
            "reason_code": "unsupported_format",
            "run_id": "r2",
        }
        for i in range(2)
    ]
    append_images(store, "r2", pa.Table.from_pylist(new, schema=IMAGES_SCHEMA))
    settings = load_settings(None, store=store.root, report={"privacy": "blur"})
    run_report(settings, "r2", summary={"run_id": "r2"})
    text = store.read_bytes("reports/r2.html").decode()
    rows = _tables(text).tables["quarantined"][1:]
    assert [r[:2] for r in rows[:2]] == [["this run", "new0.jpg"], ["this run", "new1.jpg"]]
    assert {r[0] for r in rows[2:]} == {"earlier"}
    assert f"Quarantined images ({MAX_QUARANTINED_ROWS + 8}; 2 of this run)" in text


def test_contact_sheets_per_identity_with_captions():
    faces = _faces(30)
    text = render_report(faces, PolicyThresholds(), privacy="blur", sample_per_status=6)
    t = _tables(text)
    assert t.figcaptions
    for cap in t.figcaptions:
        ident, status_code, score = cap.split("|")
        assert ident == "-" or ident.startswith("id")
        assert status_code.split(": ")[0] in ("auto", "review", "rejected", "human")
        assert score.startswith("score ")
    sheets = [c.split("|")[0] for c in t.figcaptions]
    # one sheet per identity, at most 6 crops each, and a sheet for faces without an identity
    for ident in set(sheets):
        assert sheets.count(ident) <= 6
    assert {"id0", "id1", "id2", "id3", "-"} <= set(sheets)
    assert "id0 (" in text and "no identity (" in text


def test_an_id_subjects_sheet_shows_no_subject_id():
    """An ID subject's identity is its subject id ("Jane_Doe_1980"): the contact sheet put it in
    the heading and under every crop of her faces, while the quarantine table hashes it."""
    faces = _faces(30)
    ids = faces.column("identity_id").to_pylist()
    kinds = faces.column("source_kind").to_pylist()
    for i in range(0, 30, 3):
        if ids[i] == "id1":
            ids[i], kinds[i] = "Jane_Doe_1980", "idcard"
    faces = faces.set_column(
        faces.schema.get_field_index("identity_id"), "identity_id", pa.array(ids)
    )
    faces = faces.set_column(
        faces.schema.get_field_index("source_kind"), "source_kind", pa.array(kinds)
    )
    text = render_report(faces, PolicyThresholds(), privacy="blur", sample_per_status=6)
    assert "Jane_Doe" not in text
    assert "subject #" in text and "id0 (" in text


def test_the_quarantine_table_names_no_subject_and_keeps_relative_paths_whole():
    """A user probe: an ID subject's folder ("Jane_Doe_<ID number>") was masked in the source
    column but printed in the reason (``wrong_layout: 'Jane_Doe_.../extra/live2.jpg' ...``),
    and the mask was sha1(name)[:8]: anyone holding the report could confirm a guessed name.
    An album path with "(2019)/" lost its end to the path stripper."""
    from evaluation.report import quarantined_rows

    subject = "Jane_Doe_110101199003071234"
    images = pa.table(
        {
            "image_uri": [
                f"/in/ids/{subject}/extra/live2.jpg",
                "/in/albums/Trip (2019)/day 1/a.jpg",
            ],
            "status": ["quarantined"] * 2,
            "source_kind": ["idcard", "album"],
            "source_group": [subject, None],
            "reason_code": ["wrong_layout"] * 2,
            "reason": [
                f"wrong_layout: '{subject}/extra/live2.jpg' is not <subject_id>/<image>",
                "wrong_layout: 'Trip (2019)/day 1/a.jpg' is not <album_id>/<image>; albums are "
                "the folders right under the source",
            ],
            "run_id": ["r1"] * 2,
        }
    )
    rows = quarantined_rows(images, "r1")
    assert subject not in repr(rows)
    sub = rows[0] if rows[0][2].startswith("idcard") else rows[1]
    assert sub[2] != "idcard subject #" + hashlib.sha1(subject.encode()).hexdigest()[:8]
    assert (
        sub[2].removeprefix("idcard ") in sub[4]
    )  # the reason names the subject as the column does
    album = next(r for r in rows if r is not sub)
    assert album[4].startswith("wrong_layout: 'Trip (2019)/day 1/a.jpg' is not <album_id>/<image>;")
    # Absolute paths still go: only the file name stays.
    text = quarantined_rows(
        images.set_column(
            images.schema.get_field_index("reason"),
            "reason",
            pa.array(["duplicate_content: same bytes as /home/x/Jane/a.jpg"] * 2),
        ),
        "r1",
    )[0][4]
    assert text == "duplicate_content: same bytes as a.jpg"


def test_run_table_renders_nested_values_as_rows():
    from tasks.summary import DatasetInfo, RunCounts, RunSummary, StoreTotals

    summary = RunSummary(
        run_id="r1",
        store="/s",
        totals=StoreTotals(images=3, quarantined=1),
        run=RunCounts(files_listed=3),
        timings={"faces_s": 1.5},
        dataset=DatasetInfo("faces", 2, 10, 3),
        models=[{"role": "recognizer", "name": "w600k", "sha256": "ab"}],
    )
    for s in (summary, {"totals": {"images": 3, "nested": {"a": 1}}, "models": [{"x": 1}]}):
        text = render_report(_faces(6), PolicyThresholds(), privacy="omit", summary=s)
        run_rows = _tables(text).tables["t0"]
        assert run_rows[0] == ["item", "value"]
        assert not any("{" in v or "[" in v for r in run_rows for v in r), run_rows
    text = render_report(_faces(6), PolicyThresholds(), privacy="omit", summary=summary)
    rows = {r[0]: r[1] for r in _tables(text).tables["t0"][1:]}
    assert rows["model 1"] == "role: recognizer, name: w600k, sha256: ab"
    assert rows["dataset"] == "faces v2: 10 faces, 3 identities"
    assert rows["seconds: faces"] == "1.5000"
    text = render_report(
        _faces(6), PolicyThresholds(), privacy="omit", summary={"totals": {"nested": {"a": 1}}}
    )
    assert {r[0]: r[1] for r in _tables(text).tables["t0"][1:]} == {"totals: nested: a": "1"}


def test_report_markdown_has_the_figures_and_the_path_as_text():
    from evaluation.report import report_markdown
    from tasks.summary import RunCounts, RunSummary, StoreTotals

    s = RunSummary("r1", "/s", StoreTotals(faces=9, quarantined=6), RunCounts(files_listed=3))
    s.timings = {"faces_s": 2.0}
    md = report_markdown(s, "s3://bucket/store/reports/r1.html")
    assert "| 9 |" in md and "| 6 |" in md and "| files listed | 3 |" in md
    assert "| faces | 2.0 |" in md
    assert "`s3://bucket/store/reports/r1.html`" in md and "](" not in md  # text, not a link
    with_plots = report_markdown(s, "s3://b/r1.html", [("face quality", "PHN2Zz4=")])
    assert "![face quality](data:image/svg+xml;base64,PHN2Zz4=)" in with_plots


def test_progress_bars_only_on_a_terminal(monkeypatch, capsys):
    from faceloop import progress

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    items = [1, 2, 3]
    assert progress.iterate(items, "x") is items
    monkeypatch.setenv("FACELOOP_PROGRESS", "0")
    assert not progress.enabled()


def test_the_run_report_reads_only_the_shown_faces_crops(tmp_path, monkeypatch):
    """A report samples a few faces per identity: the crops of the others (most of a store's
    bytes) are never read, and the sheets show the stored crop of each face they name."""
    from evaluation import report as rep
    from faceloop.config import load_settings
    from storage.tables import iter_faces, write_group

    store = _store(tmp_path, _faces(30), _images())
    # A second album whose faces are never shown (quarantined faces never are): its file is
    # never read for crops.
    other = _faces(12)
    full = {
        c: other.column(c) if c in other.column_names else pa.nulls(12, FACES_SCHEMA.field(c).type)
        for c in FACES_SCHEMA.names
    }
    full["face_id"] = pa.array([f"g{i}" for i in range(12)])
    full["source_kind"] = pa.array(["album"] * 12)
    full["source_group"] = pa.array(["album2"] * 12)
    full["status"] = pa.array(["quarantined"] * 12)
    write_group(store, "album", "album2", pa.table(full, schema=FACES_SCHEMA))
    crop_reads: list[list[tuple[str, str]]] = []
    real = rep.store_crops

    def spy(st):
        load = real(st)

        def wrapped(rows):
            crop_reads.append(sorted({(r["source_kind"], r["source_group"]) for r in rows}))
            return load(rows)

        return wrapped

    monkeypatch.setattr(rep, "store_crops", spy)
    settings = load_settings(None, store=store.root, report={"privacy": "none"})
    rep.run_report(settings, "r1")
    text = store.read_bytes("reports/r1.html").decode()
    assert crop_reads == [[("album", "album1")]]  # one read, of the sampled faces' group
    stored = {
        f: j
        for t in iter_faces(store, ["face_id", "aligned_jpeg"])
        for f, j in zip(
            t.column("face_id").to_pylist(), t.column("aligned_jpeg").to_pylist(), strict=True
        )
    }
    shown = _parse(text).imgs
    crops = [i for i in shown if i.get("alt", "").startswith("crop ")]
    assert crops and all(i["alt"].removeprefix("crop ").startswith("f") for i in crops)
    # privacy none: each sheet image is (re-encoded) the stored crop of the face its alt names:
    # of all stored crops, that one is the nearest.
    decoded = {f: np.asarray(Image.open(io.BytesIO(j)), float) for f, j in stored.items() if j}
    for i in crops[:4]:
        got = np.asarray(_decode(i["src"]), float)
        nearest = min(decoded, key=lambda f: np.abs(decoded[f] - got).mean())
        assert nearest == i["alt"].removeprefix("crop ")


def test_plot_counts_are_the_histograms_of_the_faces():
    """The plots draw counted bins (no Python object per face): the counts are numpy's
    histogram of each status and kind's scores, out-of-range scores counted in the legend's n
    only, nulls nowhere."""
    from evaluation.report import QUALITY_EDGES, SIM_EDGES, plot_counts

    faces = pa.table(
        {
            "source_kind": ["album", "album", "album", "idcard", "album", "album"],
            "status": ["auto", "auto", "review", "auto", "auto", "human"],
            "score": pa.array([0.61, -0.5, 0.31, 0.70, None, 1.0], pa.float32()),
            "quality": pa.array([0.9, 0.5, None, 0.7, 0.2, 1.0], pa.float32()),
            "identity_id": ["p1", "p1", "p2", "p3", None, "p1"],
        }
    )
    c = plot_counts(faces)
    n, hist = c.sim[("album", "auto")]
    assert n == 2 and hist.sum() == 1  # -0.5 is below the first edge; None is not counted
    assert hist[np.searchsorted(SIM_EDGES, 0.61, side="right") - 1] == 1
    assert c.sim[("idcard", "auto")][0] == 1 and c.sim[("album", "review")][0] == 1
    assert c.sim[("album", "human")][1][-1] == 1  # 1.0 falls in the last bin, as in np.histogram
    assert c.quality["auto"][0] == 4 and c.quality["review"][0] == 0
    assert c.quality["auto"][1].sum() == 4 and len(c.quality["auto"][1]) == len(QUALITY_EDGES) - 1
    assert sorted(c.sizes.tolist()) == [1, 3]  # p1: two auto + one human; p3: one; p2 in review


def test_a_stores_report_from_its_summaries_is_the_report_of_its_faces(tmp_path, faces_file_reads):
    """The run report is made from the per-file summaries and the files holding the shown
    identities only; it is the same HTML, byte for byte, as the report rendered from every face
    (many faces without an identity, ties of score, nulls, quarantined and human faces, ID cards,
    identities across files), and it reads no faces file but those."""
    from evaluation.report import _images, _store_report, store_crops
    from storage.objectstore import open_store
    from storage.secret import pseudonym
    from storage.tables import read_faces, write_group
    from tasks.publish import SUBJECT_PREFIX
    from tasks.summary import SHEET_ROW

    store = open_store(str(tmp_path / "store"))
    rng = np.random.default_rng(7)
    statuses = ["auto", "auto", "auto", "review", "rejected", "human", "quarantined", None]
    for g in range(30):
        kind = "idcard" if g % 5 == 0 else "album"
        n = int(rng.integers(0, 40))
        ident = [
            None if rng.random() < 0.35 else f"id{int(rng.integers(0, 60)):02d}" for _ in range(n)
        ]
        score = [
            None if rng.random() < 0.1 else round(float(rng.uniform(-0.3, 1.0)), 1) for _ in ident
        ]
        write_group(
            store,
            kind,
            f"g{g}",
            pa.table(
                {
                    "face_id": [f"g{g}-f{i}" for i in range(n)],
                    "image_uri": [f"file:///x/g{g}/{i}.jpg" for i in range(n)],
                    "source_kind": [kind] * n,
                    "source_group": [f"g{g}"] * n,
                    "role": ["album" if kind == "album" else "live"] * n,
                    "status": [statuses[int(rng.integers(0, len(statuses)))] for _ in range(n)],
                    "reason": ["outlier: 0.2 < 0.3"] * n,
                    "score": pa.array(score, pa.float32()),
                    "quality": pa.array(rng.uniform(0, 1, n).tolist(), pa.float32()),
                    "identity_id": ident,
                    "aligned_jpeg": [_crop(i) for i in range(n)],
                }
            ),
        )
    th = PolicyThresholds()
    faces = read_faces(store, columns=SHEET_ROW.names)
    for privacy in ("blur", "omit"):
        for per in (3, 12):
            want = render_report(
                faces,
                th,
                title="t",
                privacy=privacy,
                sample_per_status=per,
                images=_images(store),
                crops=store_crops(store),
                subject_label=lambda g: SUBJECT_PREFIX + pseudonym(store, "subject", g),
            )
            got, _ = _store_report(
                store,
                th,
                title="t",
                privacy=privacy,
                sample_per_status=per,
                evaluation=None,
                summary=None,
            )
            assert got == want, (privacy, per)

    # Nothing written since: the report reads the files of the shown identities (and their
    # crops), not the store.
    reads = faces_file_reads
    reads.clear()
    _store_report(
        store, th, title="t", privacy="omit", sample_per_status=8, evaluation=None, summary=None
    )
    assert reads == []
