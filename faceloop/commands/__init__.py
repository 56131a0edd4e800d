"""CLI sub-commands. Each module exposes ``register(subparsers)``; faceloop/cli.py loads them.

A command handler receives the parsed ``argparse.Namespace`` and returns a process exit code.
Handlers print their human-readable output (this is the CLI edge); library code logs.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.objectstore import ObjectStore

COMMAND_MODULES = (
    "faceloop.commands.core",  # refresh, demo, models
    "faceloop.commands.datasets",  # datasets list|show|verify|gc
    "faceloop.commands.explain",  # explain FACE_ID|IMAGE
    "faceloop.commands.config",  # config show
    "faceloop.commands.review",  # review up|down|push|pull|webhook
    "faceloop.commands.evaluate",  # eval, calibrate
    "faceloop.commands.bench",  # bench
    "faceloop.commands.train",  # train, models register
    "faceloop.commands.loop_eval",  # loop-eval
    "faceloop.commands.doctor",  # doctor
    "faceloop.commands.status",  # status
    "faceloop.commands.forget",  # forget
)


# Characters a terminal acts on rather than shows: C0/C1 controls (ESC starts a sequence that can
# hide or rewrite what follows; a newline forges a line) and the bidirectional overrides that
# reorder what a reader sees (U+202A-U+202E, U+2066-U+2069).
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> str:
    """``text`` as a terminal may print it: each control or bidirectional-override character
    written as its escape (``\\x1b``, ``\\n``, ``\\u202e``). File, album and subject names come
    from whoever fills a source, so a command printing them must not let them act on the
    terminal."""
    return _UNSHOWN.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def open_existing_store(root: str) -> ObjectStore:
    """The store at ``root``; FaceloopError (exit 1) when the path holds none
    (:func:`storage.objectstore.holds_a_store`): a mistyped ``--store`` is not an empty store,
    and a command that amends one (forget's tombstones, review's state) must not create it."""
    from faceloop.errors import FaceloopError
    from storage.objectstore import holds_a_store, open_store

    store = open_store(root)
    if not holds_a_store(store):
        raise FaceloopError(f"no store at {store.uri('')}")
    return store


def store_of(args: Any) -> str:
    """The store a command's ``--store`` / ``--config`` name: ``--store`` wins, but a
    ``--config`` given beside it is still read (a missing or invalid one is exit 2, as for
    every command: doctor and explain ran on without a word)."""
    from faceloop.config import load_settings

    if args.config is not None or not args.store:
        settings = load_settings(args.config, **({"store": args.store} if args.store else {}))
        return settings.store
    return str(args.store)


def share(lo: float, hi: float) -> Any:
    """argparse type of a number strictly between ``lo`` and ``hi``: a value out of range is a
    usage error (exit 2), not a ValueError deep in the command."""
    import argparse

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo < x < hi:
            raise argparse.ArgumentTypeError(f"{x:g} is outside ({lo:g}, {hi:g})")
        return x

    return parse


def port(text: str) -> int:
    """argparse type of a TCP port (1-65535)."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError(f"{n} is not a port (1-65535)")
    return n


def positive_int(text: str) -> int:
    """argparse type of a count: an int >= 1 (``--images 0`` must not fall back to a default)."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def dataset_version(text: str) -> int | str:
    """argparse type of a dataset version: ``N``, ``vN`` (N >= 1) or ``latest``."""
    import argparse

    if text.strip().lower() == "latest":
        return "latest"
    t = text.strip().lower().removeprefix("v")
    if not t.isdigit() or int(t) < 1:
        raise argparse.ArgumentTypeError(f"version must be N, vN (N >= 1) or latest, not {text!r}")
    return int(t)
