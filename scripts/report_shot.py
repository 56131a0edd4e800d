"""Build a small store, write its run report (privacy "blur") and screenshot it with headless
Chromium: ``make report-shot`` (PNGs under var/report-shot/).

The store is synthetic (coloured crops, made-up identities, a few quarantined images), so the
shot shows every section of evaluation/report.py without any real face. Chromium: ``apt-get
install -y chromium`` (Debian), or set CHROMIUM to its path.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from evaluation.report import report_for_store
from faceloop.config import PolicyThresholds
from faceloop.schema import FACES_SCHEMA, IMAGES_SCHEMA
from storage.objectstore import open_store
from storage.tables import append_images, write_group
from tasks.summary import RunCounts, RunSummary, store_counts

OUT = Path(os.environ.get("REPORT_SHOT_DIR", "var/report-shot"))


def _crop(rng: np.random.Generator, hue: int) -> bytes:
    im = Image.new("RGB", (112, 112), (40 + hue % 200, 90, 200 - hue % 150))
    d = ImageDraw.Draw(im)
    d.ellipse([26, 16, 86, 96], fill=(220, 180, 150))
    d.ellipse([40, 44, 50, 54], fill=(30, 30, 30))
    d.ellipse([62, 44, 72, 54], fill=(30, 30, 30))
    d.arc([44, 62, 70, 80], 20, 160, fill=(120, 40, 40), width=3)
    arr = np.asarray(im).astype(np.int16) + rng.integers(-12, 12, (112, 112, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def build_store(root: Path) -> RunSummary:
    rng = np.random.default_rng(7)
    rows = []
    n = 0
    plan = {"id-a": 14, "id-b": 9, "id-c": 6, "id-d": 3}
    for k, (ident, size) in enumerate(plan.items()):
        for i in range(size):
            status, code, score = "auto", "auto_identity", float(rng.uniform(0.55, 0.9))
            if ident == "id-b" and i == 0:
                status, code, score = "review", "outlier", 0.21
            if ident == "id-c" and i < 2:
                status, code, score = "review", "low_quality", float(rng.uniform(0.6, 0.9))
            if ident == "id-d":
                status, code = "review", "too_few_faces"
            if ident == "id-a" and i == 1:
                status, code = "human", "human_confirmed"
            rows.append((f"f{n}", ident, status, code, score, k * 50))
            n += 1
    for i in range(4):
        rows.append((f"f{n}", None, "rejected", "unclustered_singleton", 0.12, 180 + i))
        n += 1
    faces = []
    for fid, ident, status, code, score, hue in rows:
        r = {c: None for c in FACES_SCHEMA.names}
        r.update(
            face_id=fid,
            image_uri=f"/data/photos/album1/{fid}.jpg",
            image_sha256=fid,
            source_kind="album",
            source_group="album1",
            role="album",
            face_index=0,
            identity_id=ident,
            status=status,
            reason_code=code,
            reason=f"{code}: synthetic",
            score=score,
            quality=float(rng.uniform(0.1, 0.9)),
            aligned_jpeg=_crop(rng, hue),
            run_id="r1",
        )
        faces.append(r)
    store = open_store(str(root))
    write_group(store, "album", "album1", pa.Table.from_pylist(faces, schema=FACES_SCHEMA))
    images = [
        {"image_uri": f"/data/photos/album1/f{i}.jpg", "status": "ok"} for i in range(len(faces))
    ]
    for i, (code, why) in enumerate(
        [
            ("not_an_image", "cannot identify image file"),
            ("too_large", "90000000 pixels > 50000000"),
            ("truncated", "image file is truncated"),
            ("not_an_image", "cannot identify image file"),
            ("unreadable", "permission denied"),
            ("duplicate_content", "same bytes as album1/f3.jpg"),
        ]
    ):
        images.append(
            {
                "image_uri": f"/data/photos/album1/broken-{i}.jpg",
                "source_kind": "album",
                "source_group": "album1",
                "status": "quarantined",
                "reason_code": code,
                "reason": f"{code}: {why}",
            }
        )
    full = [{c: None for c in IMAGES_SCHEMA.names} | r | {"run_id": "r1"} for r in images]
    append_images(store, "r1", pa.Table.from_pylist(full, schema=IMAGES_SCHEMA))
    return RunSummary(
        run_id="r1",
        store=str(root),
        totals=store_counts(store),
        run=RunCounts(files_listed=len(images), new_images=len(images) - 6, quarantined=6),
        timings={"discover_s": 0.4, "faces_s": 12.3, "label_s": 1.1, "publish_s": 0.6},
        models=[{"role": "recognizer", "name": "w600k_r50.onnx", "sha256": "ab12cd"}],
    )


def chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    summary = build_store(OUT / "store")
    html_path = report_for_store(
        str(OUT / "store"),
        PolicyThresholds(),
        OUT / "report.html",
        privacy="blur",
        summary=summary,
        title="faceloop run r1 (synthetic store)",
    )
    exe = chromium()
    if exe is None:
        print(f"report at {html_path}; no Chromium found (apt-get install -y chromium)")
        return 1
    for name, height in (("report-top", 1400), ("report-full", 5200)):
        png = (OUT / f"{name}.png").absolute()
        subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size=1280,{height}",
                f"--screenshot={png}",
                html_path.absolute().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
