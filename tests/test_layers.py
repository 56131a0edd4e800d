"""The rooms of the house and what each may import (docs/DESIGN.md, "Rooms").

A module may import from its own room and from rooms *below* it, never from a room above:
imports are read from the source (lazy imports inside functions included), so a shortcut taken
inside a function body is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. faceloop.cli / faceloop.commands are the entry points above everything;
# faceloop.dataset re-exports the reader (storage room); the rest of faceloop/ (config, schema,
# vocab, errors, ...) is the core at the bottom.
RANKS = {
    "faceloop": 0,
    "storage": 1,
    # The training reader's public name: an alias module of storage.dataset in the storage room
    # (docs/DESIGN.md); nothing in the core imports it.
    "faceloop.dataset": 1,
    "training": 2,
    "tasks": 3,
    "annotate": 4,
    "evaluation": 5,
    "flows": 6,
    "benchmarks": 7,
    "faceloop.cli": 8,
    "faceloop.commands": 8,
}
ROOMS = (
    "faceloop",
    "storage",
    "training",
    "tasks",
    "annotate",
    "evaluation",
    "flows",
    "benchmarks",
)


def room_of(module: str) -> str | None:
    """The room of a dotted module name (the longest matching key of RANKS), or None."""
    parts = module.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in RANKS:
            return key
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # `from tasks import cluster` imports tasks.cluster
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def source_files() -> list[Path]:
    return sorted(p for room in ROOMS for p in (ROOT / room).rglob("*.py"))


def test_every_room_exists() -> None:
    for room in ROOMS:
        assert (ROOT / room / "__init__.py").is_file(), room


def test_no_module_imports_from_a_room_above_it() -> None:
    violations = []
    for path in source_files():
        me = module_name(path)
        mine = room_of(me)
        assert mine is not None, me
        for line, target in imported_modules(path):
            theirs = room_of(target)
            if theirs is not None and RANKS[theirs] > RANKS[mine]:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {mine} -> {target} ({theirs})")
    assert not violations, "imports from a room above:\n" + "\n".join(violations)


def test_tasks_holds_pipeline_stages_only() -> None:
    stages = {
        "discover",
        "decode",
        "faces",
        "ray_faces",
        "align",
        "quality",
        "backends",
        "cluster",
        "purity",
        "idcard",
        "label",
        "reembed",
        "publish",
        "summary",
    }
    found = {p.stem for p in (ROOT / "tasks").glob("*.py")} - {"__init__"}
    assert found <= stages, f"not a pipeline stage: {sorted(found - stages)}"


@pytest.mark.parametrize("module", ["flows.refresh", "flows.review", "faceloop.cli"])
def test_the_refresh_does_not_import_torch(module: str) -> None:
    """torch is for training and the reader's DataLoader; a refresh loads it only when a
    registered model needs it."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert out.stdout.strip() == "False", f"{module} imports torch"
