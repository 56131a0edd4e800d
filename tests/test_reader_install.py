"""The core install is the training reader: a fresh venv with `pip install <repo>` (real deps
from the index, no torch) streams a published version, and no heavy package came with it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_dataset import solid_rgb, write_dataset

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("faceloop", "storage", "training", "tasks", "annotate", "evaluation", "flows")
HEAVY = {
    "torch",
    "prefect",
    "ray",
    "label-studio-sdk",
    "onnxruntime",
    "insightface",
    "hdbscan",
    "faiss-cpu",
    "matplotlib",
    "opencv-python",
    "opencv-python-headless",
    "scipy",
    "scikit-learn",
    "pydantic",
}

SCRIPT = """
import sys
import faceloop.dataset as fd
assert "torch" not in sys.modules, "importing the reader imported torch"
assert fd.FaceShardDataset is fd.FaceShardReader  # no torch here: the torch-free reader
ds = fd.FaceShardReader(sys.argv[1], "faces", rank=0, world_size=1, seed=3, batch_size=4)
got = [(x.shape, x.dtype.name, y) for x, y in ds.iter_samples()]
assert len(got) == 9 and all(s == (3, 112, 112) and d == "float32" for s, d, _ in got), got
want = fd.partition_indices([5, 4], seed=3, epoch=0, rank=0, world_size=1, shuffle_window=4)
assert [y for _, _, y in got] == want.tolist()
state = ds.state_dict()
assert (state["yielded"], state["world_size"], state["rank"]) == (9, 1, 0), state
ds2 = fd.FaceShardReader(sys.argv[1], "faces", rank=0, world_size=1, batch_size=4, batched=True)
assert [len(y) for _, y in ds2.iter_batches()] == [4, 4, 1]
assert "torch" not in sys.modules
print("ok")
"""


@pytest.mark.timeout(900)
def test_core_install_streams_a_version_without_torch(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: an in-tree build would leave build/ and egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in (*PACKAGES, "benchmarks"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", str(src)], check=True, timeout=600, cwd=tmp_path)
    store = tmp_path / "store"
    write_dataset(store, "faces", [5, 4], list(range(9)), lambda i, lab: solid_rgb((i * 20, 9, 9)))
    out = subprocess.run(
        [py, "-c", SCRIPT, str(store)],
        cwd=tmp_path,  # the installed package, not the repository
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    listed = subprocess.run(
        [py, "-m", "pip", "--disable-pip-version-check", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"faceloop", "numpy", "pyarrow", "pillow", "boto3"} <= names, names
    assert not names & HEAVY, sorted(names & HEAVY)
