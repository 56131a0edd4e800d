"""The ``faceloop`` command line: parser, help formatting, logging and exit codes.

Sub-commands live in faceloop/commands/<area>.py, each with ``register(subparsers)``. This module
gives every parser the same help formatter (defaults shown), a description (the sub-command's
one-line help), ``-v/--verbose`` before or after the sub-command, and turns errors into one
``faceloop: error: ...`` line and the exit codes of faceloop/errors.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from faceloop.commands import COMMAND_MODULES
from faceloop.errors import EXIT_FAILED, FaceloopError
from faceloop.localnet import no_phoning_home
from faceloop.logs import quiet_tracebacks
from faceloop.memory import configure_memory

# Nothing phones home from a faceloop process (Prefect telemetry, Ray usage stats).
no_phoning_home()

DESCRIPTION = """\
faceloop turns photo albums and ID-card photos into reviewed, versioned face training sets.

It finds, aligns and embeds the faces, groups them into identities, sends the doubtful ones to
human review (Label Studio) and publishes the accepted faces as dataset versions of sharded
Parquet files in a local or S3 store. Face photos are biometric data: keep stores private.
"""

EPILOG = """\
exit codes: 0 ok, 1 the command failed, 2 bad usage or configuration, 3 another writer holds
the store. `faceloop COMMAND --help` describes a command; `faceloop config show` prints the
effective settings.
"""

VERBOSE_HELP = "more logging (-vv: debug); errors with their traceback"
QUIET_HELP = "warnings and errors only: no line of counts per stage (a cron job's mail)"


def version() -> str:
    """The installed distribution's version, else the source tree's pyproject.toml."""
    from faceloop import version as _version

    return _version()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after an option's help unless the help already speaks of its
    default or there is nothing to show (None, False of a flag, suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or isinstance(action, argparse._CountAction)
        ):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def _sub_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def iter_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command parser below it (each once)."""
    seen: set[int] = set()
    todo = [parser]
    while todo:
        p = todo.pop(0)
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield p
        for action in _sub_actions(p):
            todo.extend(action.choices.values())


# Options that name a place or a thing: an empty value (``--store "$UNSET"``) is refused rather
# than read as "not given" (the config's store: a forget or gc on another store than meant) or
# as the working directory.
_NAMES = {
    "store", "config", "out", "base", "data_dir", "labelled", "root", "embeddings",
    "exclude_bench", "gpu_images", "identity", "subject", "image", "name", "recognizer",
    "expected_sha256", "file", "target", "email",
}  # fmt: skip


def _given(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty")
    return value


def _finish(parser: argparse.ArgumentParser) -> None:
    """Same formatter everywhere, a description for each sub-command, -v after it too, and no
    empty value for an option in ``_NAMES``."""
    for p in iter_parsers(parser):
        p.formatter_class = HelpFormatter
        for a in p._actions:
            if a.dest in _NAMES and a.type is None and a.nargs != 0:
                a.type = _given
        for action in _sub_actions(p):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, child in action.choices.items():
                text = helps.get(name)
                if child.description is None and text:
                    child.description = text[0].upper() + text[1:] + "."
        if p is not parser and "--verbose" not in p._option_string_actions:
            p.add_argument(
                "-v",
                "--verbose",
                action="count",
                dest="sub_verbose",
                default=argparse.SUPPRESS,
                help=VERBOSE_HELP,
            )
        if p is not parser and "--quiet" not in p._option_string_actions:
            p.add_argument(
                "-q",
                "--quiet",
                action="store_true",
                dest="sub_quiet",
                default=argparse.SUPPRESS,
                help=QUIET_HELP,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceloop", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"faceloop {version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _finish(parser)
    return parser


def _error(message: str) -> None:
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"faceloop: error: {line}", file=sys.stderr)


# Seconds a SIGTERM'd command gets to unwind before the process ends regardless: a scheduler
# that sends SIGTERM expects the process gone soon (Kubernetes: SIGKILL after 30 s), and
# Prefect's client, stopped while its temporary server starts, retried for ~70 s.
SIGTERM_GRACE_S = 10.0


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # SIGTERM (a scheduler's stop, `timeout`, `kill`) unwinds like Ctrl-C: `finally` blocks and
    # atexit run, so what a command started is stopped (a bench's Prefect server, in its own
    # session, outlived a killed bench). Prefect chains to this from inside a flow run.
    code = 128 + signum

    def hard_exit() -> None:
        time.sleep(SIGTERM_GRACE_S)
        _stop_temporary_servers()
        _stop_ray()
        os._exit(code)

    threading.Thread(target=hard_exit, name="faceloop-sigterm-grace", daemon=True).start()
    raise SystemExit(code)


def _stop_temporary_servers() -> None:
    """Stop the temporary Prefect servers this process started: Prefect stops them from an
    atexit handler, which ``os._exit`` skips (a refresh stopped by Ctrl-C or SIGTERM left its
    server and database running)."""
    server = sys.modules.get("prefect.server.api.server")
    if server is None:
        return
    for s in list(getattr(server.SubprocessASGIServer, "_instances", {}).values()):
        with contextlib.suppress(Exception):
            s.stop()


def _stop_ray() -> None:
    """Stop (or leave) the Ray this process started or joined: Ray does it from an atexit
    handler, which ``os._exit`` skips (a refresh stopped by Ctrl-C left its Ray's dashboard and
    runtime-env agents running for another minute or more). A cluster joined by ``ray.address``
    is left as the process ends, without a shutdown: nothing of it runs here, and against a head
    that had died the shutdown hung ~20 s, then aborted the process (exit 134, not 143)."""
    ray = sys.modules.get("ray")
    ray_faces = sys.modules.get("tasks.ray_faces")
    if ray_faces is not None and ray_faces._joined.get("address") is not None:
        return
    with contextlib.suppress(Exception):
        if ray is not None and ray.is_initialized():
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (faceloop/errors.py, README "Exit codes").

    Called as the ``faceloop`` program (``argv`` None: the process is the command's), a
    command stopped by Ctrl-C or SIGTERM ends the process here, once its own cleanup has run:
    native threads (onnxruntime's pools, Ray's) still unwinding at interpreter shutdown
    aborted it (exit 134, 139) instead of exiting 130 / 143."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        code = _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if argv is None and code in (130, 128 + signal.SIGTERM):
        # (Not logging.shutdown(): Prefect's API log handler would wait on a server already
        # stopped.)
        _stop_temporary_servers()
        _stop_ray()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()
    except KeyboardInterrupt:
        # Ctrl-C while the commands are imported (a second or two): one line, as later on.
        print("faceloop: error: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        # The core install (``pip install faceloop``) is the training reader alone: its
        # ``faceloop`` program died with a traceback from the commands' first import.
        print(
            "faceloop: error: the faceloop command needs the pipeline install (pip install "
            f"'faceloop[pipeline]'); module {exc.name!r} is missing. The core install is the "
            "training reader alone (faceloop.dataset).",
            file=sys.stderr,
        )
        return EXIT_FAILED
    args = parser.parse_args(argv)
    verbose: int = args.verbose + getattr(args, "sub_verbose", 0)
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        quiet_tracebacks()
    # -vv is faceloop's debug log: the S3 and HTTP libraries' own debug lines carry every key
    # read (photo paths, subject folders) and the requests' Authorization headers.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    configure_memory()
    quiet = (args.quiet or getattr(args, "sub_quiet", False)) and not verbose
    if args.command in ("refresh", "demo") and not quiet:
        # One line of counts per stage (faceloop/progress.py) is what a refresh shows by default.
        logging.getLogger("faceloop.stages").setLevel(min(level, logging.INFO))
    if args.command in ("refresh", "demo"):
        if api_url := os.environ.get("PREFECT_API_URL"):
            # A server that takes connections and never answers: named within seconds, not
            # after Prefect's client has retried for ~7 minutes.
            from faceloop.localnet import check_prefect_api

            try:
                check_prefect_api(api_url)
            except FaceloopError as exc:
                _error(str(exc))
                return exc.exit_code
            except KeyboardInterrupt:
                _error("interrupted")
                return 130
        else:
            # This run starts a temporary Prefect server; those of refreshes that were killed
            # (SIGKILL, OOM, a cron timeout) were never stopped.
            from faceloop.localnet import (
                check_prefect_home,
                detach_temporary_prefect_server,
                stop_orphaned_prefect_servers,
            )

            try:
                check_prefect_home()
            except FaceloopError as exc:
                _error(str(exc))
                return exc.exit_code

            if stopped := stop_orphaned_prefect_servers():
                logging.getLogger("faceloop").warning(
                    "stopped %d Prefect temporary server(s) left by killed runs", len(stopped)
                )
            detach_temporary_prefect_server()
    func: Any = args.func
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except SystemExit as exc:
        # SIGTERM inside a flow run: Prefect's handler ends it with SystemExit(15).
        if exc.code in (signal.SIGTERM, 128 + signal.SIGTERM):
            _error("terminated")
            return 128 + signal.SIGTERM
        raise
    except BrokenPipeError:
        # The reader went away (`faceloop config show | head`): not an error worth a line.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except FaceloopError as exc:
        if verbose:
            traceback.print_exc()
        _error(str(exc) or type(exc).__name__)
        return exc.exit_code
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        if isinstance(exc, RuntimeError) and str(exc).startswith("Failed to reach API at "):
            # Prefect's client, with PREFECT_API_URL naming a server that is not there
            _error(
                f"Prefect: {exc}: start that server (`prefect server start`), or unset "
                "PREFECT_API_URL to run on a temporary one"
            )
            return EXIT_FAILED
        if isinstance(exc, FileNotFoundError) and "No usable temporary directory" in str(exc):
            # tempfile found no writable folder (a read-only root filesystem in a container)
            _error(
                "no writable temporary folder (TMPDIR, /tmp, /var/tmp are missing or read-only): "
                "set TMPDIR to a writable folder"
            )
            return EXIT_FAILED
        if isinstance(exc, PermissionError):
            # a store (or a file of it) of another owner, or with its mode changed
            where = exc.filename or "a file"
            _error(
                f"permission denied: {where}: the user running faceloop must be able to read "
                "and write the store and read the sources (check the owner and mode of that "
                f"path and of its folders: `ls -ld`){'' if verbose else ' (-v: the traceback)'}"
            )
            return EXIT_FAILED
        hint = "" if verbose else " (-v shows the traceback)"
        _error(f"{type(exc).__name__}: {exc}{hint}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
