"""scripts/gpu_kit.sh: the script parses, and the configs it writes are valid faceloop configs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from faceloop.config import load_settings

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_kit.sh"


def _config(tmp_path: Path, device: str) -> Path:
    src = f'source <(sed -n "/^config()/,/^}}/p" {SCRIPT}); config "$@"'
    where = [str(tmp_path / name) for name in ("store", "albums", "models")]
    out = subprocess.run(
        ["bash", "-c", src, "-", *where, device],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = tmp_path / f"{device}.yaml"
    path.write_text(out)
    return path


def test_script_parses_and_refuses_unknown_commands() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    bad = subprocess.run(["bash", str(SCRIPT), "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_configs_are_valid_and_the_gpu_one_batches(tmp_path: Path) -> None:
    gpu = load_settings(_config(tmp_path, "cuda"))
    cpu = load_settings(_config(tmp_path, "cpu"))
    assert (gpu.models.det_batch, gpu.models.embed_batch) == (32, 256)
    assert gpu.ray.num_gpus_per_actor == 0.25 and gpu.ray.actors == 4
    assert cpu.models.det_batch == 1 and cpu.ray.num_gpus_per_actor == 0.0
    for s in (gpu, cpu):
        assert s.sources[0].kind == "album" and s.sources[0].uri == str(tmp_path / "albums")
        assert s.models.root == str(tmp_path / "models") and not s.review.enabled
