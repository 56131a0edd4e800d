"""faceloop: photo albums and ID-card photos into reviewed, versioned face training sets.

``faceloop.__version__`` is the installed distribution's version (the source tree's
pyproject.toml when it is not installed), as ``faceloop --version`` prints it."""

from __future__ import annotations


def version() -> str:
    """The installed distribution's version, else the source tree's pyproject.toml."""
    import importlib.metadata

    try:
        return importlib.metadata.version("faceloop")
    except importlib.metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return version()
    raise AttributeError(f"module 'faceloop' has no attribute {name!r}")
