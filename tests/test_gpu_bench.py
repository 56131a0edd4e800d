"""benchmarks/gpu.py: the GPU detect+embed bench, run here on the CPU provider.

Its SCRFD decoding must find what the refresh's backend (insightface's SCRFD) finds, and it must
run without Ray, Prefect, pydantic, insightface or hdbscan (a GPU machine may have none of them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from faceloop.samples import sample_photos

    out = tmp_path_factory.mktemp("photos")
    n = 0
    for key, p in sorted(sample_photos().items()):
        img = cv2.imread(str(p))
        if img is None or min(img.shape[:2]) < 200:  # the bench does not pad tiny crops
            continue
        cv2.imwrite(str(out / f"{key}.jpg"), img)
        n += 1
    assert n >= 3
    return out


def test_engine_finds_what_the_backend_finds(model_root, photos):
    from benchmarks.gpu import find_models, load_engine
    from faceloop.config import ModelSettings
    from tasks.align import align_face
    from tasks.backends import load_backend

    backend = load_backend(ModelSettings(root=str(model_root), det_input="image"))
    engine, used = load_engine(
        find_models(str(Path(model_root) / "insightface")),
        "cpu",
        threads=1,
        batch=8,
        det_batch=1,
        det_size=640,
        det_input="image",
        cache_dir=Path("/nonexistent"),
    )
    assert used["detector"] == ["CPUExecutionProvider"]
    faces = 0
    for f in sorted(photos.iterdir()):
        img = cv2.imread(str(f))
        ref = backend.detect(img)
        (dets, kps) = engine.detect([img])[0]
        assert len(dets) == len(ref), f.name
        np.testing.assert_allclose(dets[:, :4], ref.boxes, atol=0.05)
        np.testing.assert_allclose(dets[:, 4], ref.scores, atol=1e-4)
        np.testing.assert_allclose(kps, ref.landmarks, atol=0.05)
        crops = [align_face(img, lm) for lm in kps]
        cos = (engine.embed(crops) * backend.embed(crops)).sum(axis=1)
        assert cos.min() > 0.9999
        faces += len(dets)
    assert faces >= 10


def test_cpu_run_reports_layouts_providers_and_models(model_root, photos):
    from benchmarks.gpu import run_gpu_bench

    res = run_gpu_bench(
        photos,
        providers=["cpu"],
        batches=[4],
        workers=[1],
        models=str(Path(model_root) / "insightface"),
        cpu_workers=2,
        say=lambda msg: None,
    )
    assert res["images"] >= 3
    assert all(m["matches_faceloop_record"] for m in res["models"])
    (lay,) = res["layouts"]
    assert lay["faces"] >= 10 and lay["faces_per_s"] > 0 and lay["workers"] == 2
    assert lay["session_providers"]["recognizer"] == ["CPUExecutionProvider"]
    assert res["cpu_faces_per_s"] == lay["faces_per_s"]
    assert "gpu_faces_per_s" not in res


def test_runs_without_ray_prefect_pydantic_insightface(model_root, photos, tmp_path):
    """A child Python where those packages cannot be imported; processes layout, CUDA asked
    for where there is none: a clear refusal (exit 2), then the CPU run succeeds."""
    blocker = (
        "import sys, importlib.abc\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'ray', 'prefect', 'pydantic', 'insightface', "
        "'hdbscan', 'yaml', 'faiss', 'sklearn'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, B())\n"
        "if __name__ == '__main__':  # spawned workers import this file again\n"
        "    from benchmarks.gpu import main\n"
        "    sys.exit(main(sys.argv[1:]))\n"
    )
    script = tmp_path / "run.py"
    script.write_text(blocker)
    common = [
        sys.executable,
        str(script),
        "--images",
        str(photos),
        "--models",
        str(Path(model_root) / "insightface"),
        "--json",
    ]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = subprocess.run(
            [*common, "--provider", "cuda"], env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 2, r.stderr
        assert "CUDAExecutionProvider" in r.stderr
    r = subprocess.run(
        [
            *common,
            "--provider",
            "cpu,tensorrt",
            "--mode",
            "processes",
            "--cpu-workers",
            "2",
            "--batch-sizes",
            "8",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    (lay,) = res["layouts"]
    assert lay["mode"] == "processes" and lay["workers"] == 2 and lay["faces"] >= 10
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        assert "tensorrt" in res["skipped"]
