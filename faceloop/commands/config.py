"""``faceloop config show``: the effective settings (defaults < YAML < FACELOOP_* variables),
secrets masked."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

from faceloop.config import load_settings

MASK = "********"
# Keys whose values are secrets wherever they appear (review.token, future passwords, keys).
_SECRET_KEY = re.compile(r"token|secret|passw|api_?key|credential|private_key", re.IGNORECASE)
# user:password@ inside URLs (e.g. a database or proxy URL with its credentials).
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]+):[^/@\s]+@", re.IGNORECASE)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect the settings")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="COMMAND")
    show = csub.add_parser(
        "show", help="print the effective settings (file, environment, defaults), secrets masked"
    )
    show.add_argument(
        "--config", help="YAML config (default: built-in defaults and FACELOOP_* variables)"
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=cmd_show)


def mask_secrets(value: Any, key: str = "") -> Any:
    """``value`` with secret-looking keys' values and URL passwords replaced by ``MASK``."""
    if isinstance(value, dict):
        return {k: mask_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v, key) for v in value]
    if _SECRET_KEY.search(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", value)
    return value


def cmd_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    data = mask_secrets(settings.model_dump(mode="json"))
    # review.token is a SecretStr that dumps leave out: show whether one is set, never its value.
    data["review"]["token"] = MASK if settings.review.token else None
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    origin = f"{args.config} < " if args.config else ""
    print(f"# effective faceloop settings: defaults < {origin}FACELOOP_* environment")
    print(yaml.safe_dump(data, sort_keys=False).rstrip())
    if (line := _registered_line(settings)) is not None:
        print(line)
    return 0


def _registered_line(settings: Any) -> str | None:
    """A comment naming the store's registered recognizer, which a refresh uses instead of
    ``models.recognizer`` (and the thresholds it is judged by); None when there is none. Local
    stores only: ``config show`` stays offline."""
    if settings.store.startswith("s3://") or not Path(settings.store).is_dir():
        return None
    from training.registry import current_model, thresholds_for

    try:
        entry = current_model(settings.store)
    except Exception:  # a bad registry is the refresh's to report, with its reason
        return None
    if not entry:
        return None
    _, key = thresholds_for(settings, str(entry.get("name")), entry.get("base"))
    return (
        f"# a refresh of this store uses its registered recognizer {entry.get('name')!r} "
        f"(sha256 {entry['sha256'][:12]}...) instead of models.recognizer, judged by "
        f"policy.{key}"
    )
