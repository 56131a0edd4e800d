"""The helpers the local services need (Label Studio, Prefect, test servers): a free port on
127.0.0.1, a ``/health`` probe, and the stop of Prefect temporary servers a killed refresh left
behind. Only 127.0.0.1 is ever bound."""

from __future__ import annotations

import os
import socket
import urllib.request


def no_phoning_home() -> None:
    """Turn off what would phone home (Prefect's telemetry, which its temporary server runs;
    Ray's usage stats) unless the environment already says otherwise. Called before Prefect and
    Ray read their settings: by the CLI, and by the flows for code that calls them directly."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (racy by nature; good enough for local services and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health(url: str, timeout: float = 3.0) -> bool:
    """True when ``<url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:  # urllib.error.URLError is an OSError
        return False


# Seconds the Prefect API that PREFECT_API_URL names gets to answer before a run starts
# (check_prefect_api): a working server answers its /health in milliseconds.
PREFECT_API_ANSWER_S = 10.0


def check_prefect_api(url: str, timeout: float | None = None) -> None:
    """FaceloopError when the Prefect API at ``url`` (PREFECT_API_URL) does not answer
    ``<url>/health`` within ``timeout`` seconds (default :data:`PREFECT_API_ANSWER_S`): a
    server that accepted the connection and never answered (hung, overloaded, a proxy with
    nothing behind it) kept `faceloop refresh` silent for ~7 minutes while Prefect's client
    retried, then said "Failed to reach API", as for a server that is not there. Any answer
    (an HTTP error too) passes, and a refused connection or a bad address is left to Prefect's
    client, which says so at once."""
    import urllib.error

    from faceloop.errors import FaceloopError

    timeout = PREFECT_API_ANSWER_S if timeout is None else timeout
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.URLError as exc:  # raised by the connect (HTTPError: an answer)
        if not isinstance(exc.reason, TimeoutError):
            return
        what = "did not accept a connection"
    except TimeoutError:  # raised by the wait for the answer
        what = "accepted the connection but did not answer"
    except OSError:
        return
    raise FaceloopError(
        f"Prefect API at {url} {what} within {timeout:g} s: check that server (or restart it), "
        "or unset PREFECT_API_URL to run on a temporary one"
    )


# The marks of a Prefect temporary server (prefect.server.api.server.SubprocessASGIServer): a
# uvicorn child of the process that needed it, stopped by that process at exit.
_TEMP_SERVER_ARGV = "prefect.server.api.server:create_app"
_TEMP_SERVER_ENV = b"PREFECT__SERVER_EPHEMERAL=1"


def stop_orphaned_prefect_servers(proc: str = "/proc") -> list[int]:
    """Stop the Prefect temporary servers whose parent died without stopping them (a refresh
    killed by SIGKILL, the OOM killer or a timeout): each stays up for good, with its database
    and a port, and a scheduled refresh that is killed every hour piles them up. Only this
    user's processes that init (or a subreaper) adopted, and that run a temporary server (its
    argv and its environment say so) are stopped; a live refresh's server has its parent.
    Linux only (reads ``/proc``); elsewhere nothing. The pids stopped."""
    import signal

    if not os.path.isdir(proc):
        return []
    stopped = []
    me = os.getuid()
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        base = os.path.join(proc, entry)
        try:
            if os.stat(base).st_uid != me:
                continue
            with open(os.path.join(base, "cmdline"), "rb") as f:
                if _TEMP_SERVER_ARGV.encode() not in f.read():
                    continue
            with open(os.path.join(base, "stat")) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != 1:
                continue
            with open(os.path.join(base, "environ"), "rb") as f:
                if _TEMP_SERVER_ENV not in f.read().split(b"\0"):
                    continue
            os.kill(int(entry), signal.SIGTERM)
            stopped.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return stopped


class _DetachedSubprocess:
    """``subprocess`` as prefect.server.api.server sees it, with its Popen starting the child in
    a session of its own (everything else is the real module's)."""

    def __getattr__(self, name: str) -> object:
        import subprocess

        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: object, **kwargs: object) -> object:
        import subprocess

        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(*args, **kwargs)  # type: ignore[call-overload]


def detach_temporary_prefect_server() -> None:
    """Start the Prefect temporary server this process may need in its own session, so that a
    Ctrl-C in the terminal (SIGINT to the whole foreground process group) stops the refresh and
    not the server: with the server gone first, Prefect's exit handlers spent ~70 s retrying to
    send the run's last logs and its Crashed state before the command could exit. The server
    still stops when this process exits (Prefect's exit handler), and one a SIGKILL left behind
    is stopped by the next refresh (:func:`stop_orphaned_prefect_servers`)."""
    from prefect.server.api import server

    if not isinstance(getattr(server, "subprocess", None), _DetachedSubprocess):
        server.subprocess = _DetachedSubprocess()  # type: ignore[assignment]


def make_writable_folder(folder: str) -> None:
    """Make ``folder`` (and its parents) and create and delete one file in it: OSError when
    this user cannot (a read-only root filesystem, an unwritable HOME)."""
    import tempfile

    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


# The free space the temporary Prefect server needs in PREFECT_HOME: its database (~6 MB
# after a few runs), SQLite's write-ahead log beside it (~4 MB) and the flow runs' results.
PREFECT_HOME_MIN_FREE = 32 * 2**20


def check_prefect_home() -> None:
    """FaceloopError naming PREFECT_HOME when the temporary Prefect server could not keep its
    database there (``$PREFECT_HOME``, by default ``~/.prefect``): in a container with a
    read-only or unset HOME the server died at start, and the run printed four sqlite
    tracebacks and "Timed out while attempting to connect to ephemeral Prefect API server"
    after ~25 s; on a full file system, the same line after ~700 lines of tracebacks. It needs
    :data:`PREFECT_HOME_MIN_FREE` bytes free there."""
    import shutil

    from prefect.settings import get_current_settings

    from faceloop.errors import FaceloopError

    # The server is a subprocess: it reads PREFECT_HOME from the environment it inherits.
    home = os.environ.get("PREFECT_HOME") or os.fspath(get_current_settings().home)
    home = os.path.expanduser(home)
    try:
        make_writable_folder(home)
    except OSError as exc:
        raise FaceloopError(
            f"Prefect's home {home} cannot be written ({exc.strerror or exc}): the temporary "
            "Prefect server a run starts keeps its database there; set PREFECT_HOME to a "
            "writable folder, or PREFECT_API_URL to a running Prefect server"
        ) from None
    free = shutil.disk_usage(home).free
    if free < PREFECT_HOME_MIN_FREE:
        raise FaceloopError(
            f"Prefect's home {home} has {free // 2**20} MB free, and the temporary Prefect "
            f"server a run starts needs {PREFECT_HOME_MIN_FREE // 2**20} MB there for its "
            "database: free space on that file system, or set PREFECT_HOME to a folder on one "
            "with room, or PREFECT_API_URL to a running Prefect server"
        )
