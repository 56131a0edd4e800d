"""Start, stop and probe a local Label Studio, and receive its webhooks.

The server runs from its own venv (``<repo>/.venv-labelstudio``) through scripts/labelstudio.sh,
so there is one place that knows the environment a headless offline start needs. These helpers
are what tests and ``faceloop review up|down|webhook`` call.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Self

from faceloop.errors import ConfigError, FaceloopError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "labelstudio.sh"
# scripts/labelstudio.sh's venv: ``LS_VENV`` as the script reads it, else <repo>/.venv-labelstudio.
VENV = Path(os.environ.get("LS_VENV") or REPO / ".venv-labelstudio")
DEFAULT_DATA_DIR = REPO / "var" / "labelstudio"


class LabelStudioUnavailable(FaceloopError):
    """Label Studio could not be reached (after retries) or could not be started."""


@dataclass(frozen=True)
class ServerInfo:
    url: str
    token: str = field(repr=False)
    data_dir: Path
    port: int

    @property
    def password_file(self) -> Path:
        return self.data_dir / "admin-password"


def installed() -> bool:
    """True when the Label Studio venv has the pinned version (checked by the script)."""
    return (VENV / "bin" / "label-studio").exists()


def install() -> None:
    """Install Label Studio into its venv; a no-op when it is there already."""
    _script("install", {}, timeout=1800)


def _script(
    cmd: str, env: dict[str, str], timeout: float, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    if not SCRIPT.exists():
        raise ConfigError(f"missing {SCRIPT}")
    full = {**os.environ, **env}
    proc = subprocess.run(
        ["bash", str(SCRIPT), cmd, *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0 and cmd != "status":
        raise LabelStudioUnavailable(f"labelstudio.sh {cmd} failed: {proc.stderr.strip()[-800:]}")
    log.info("labelstudio.sh %s: %s", cmd, proc.stderr.strip().splitlines()[-1:] or "")
    return proc


LOCAL_WEBHOOKS_WARNING = (
    "warning: --allow-local-webhooks turns Label Studio's SSRF protection off for EVERY account: "
    "any annotator can then make the Label Studio server send requests to local and private "
    "addresses (this host's services, the LAN, cloud metadata endpoints). Answers reach faceloop "
    "without it: `faceloop review pull` or the scheduled review-pull deployment."
)


def _env(
    data_dir: Path, port: int, token: str | None, allow_local_webhooks: bool
) -> dict[str, str]:
    env = {"LS_DATA_DIR": str(data_dir), "LS_PORT": str(port)}
    if token:
        env["LABEL_STUDIO_API_KEY"] = token
    if allow_local_webhooks:
        env["LS_ALLOW_LOCAL_WEBHOOKS"] = "1"
    return env


def start(
    data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR,
    port: int = 8080,
    *,
    token: str | None = None,
    allow_local_webhooks: bool = False,
    timeout: float = 300,
) -> ServerInfo:
    """Start Label Studio on 127.0.0.1:``port`` (no-op if already running from ``data_dir``)
    and return its URL and admin API token once ``/health`` answers.

    ``token`` presets the admin token; without one a random token is generated into
    ``<data_dir>/admin-token`` (mode 600) on first start and reused. ``allow_local_webhooks``
    switches Label Studio's SSRF protection off for every account (see
    :data:`LOCAL_WEBHOOKS_WARNING`); off by default, answers are pulled instead.
    """
    if allow_local_webhooks:
        log.warning(LOCAL_WEBHOOKS_WARNING)
    data = Path(data_dir).absolute()
    if not installed():
        raise LabelStudioUnavailable(f"Label Studio is not installed: run {SCRIPT} install")
    _script("start", _env(data, port, token, allow_local_webhooks), timeout=timeout)
    tok = token or (data / "admin-token").read_text().strip()
    return ServerInfo(url=f"http://127.0.0.1:{port}", token=tok, data_dir=data, port=port)


def stop(data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR, port: int = 8080) -> None:
    """Stop the server started from ``data_dir`` (its whole process group); no-op if stopped."""
    _script("stop", _env(Path(data_dir).absolute(), port, None, False), timeout=60)


def status(data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR, port: int = 8080) -> str:
    """One line: ``running ...``, ``stopped`` or ``starting-or-unhealthy ...``."""
    return _script(
        "status", _env(Path(data_dir).absolute(), port, None, False), timeout=30
    ).stdout.strip()


@dataclass(frozen=True)
class Annotator:
    """An annotator login; the secrets stay in their mode-600 files."""

    id: int
    email: str
    created: bool
    password_file: Path
    token_file: Path

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()


def add_annotator(
    email: str, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR, password: str | None = None
) -> Annotator:
    """Create (or update) the Label Studio account ``email`` in the server started from
    ``data_dir`` and return where its password and API token are. Signup is closed on our
    server, so this is how annotators get a login; a password is generated unless given."""
    env = {"LS_DATA_DIR": str(Path(data_dir).absolute())}
    if password:
        env["LS_USER_PASSWORD"] = password
    out = _script("add-user", env, timeout=120, args=(email,)).stdout.strip().splitlines()
    rec = json.loads(out[-1])
    return Annotator(
        id=int(rec["id"]),
        email=rec["email"],
        created=bool(rec["created"]),
        password_file=Path(rec["password_file"]),
        token_file=Path(rec["token_file"]),
    )


def read_token(data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> str | None:
    """The admin token that ``start`` generated, if any."""
    path = Path(data_dir) / "admin-token"
    return path.read_text().strip() if path.exists() else None


def data_dir_of(given: str | os.PathLike[str] | None, configured: str | None) -> Path:
    """The data dir a command uses: ``--data-dir``, else ``review.data_dir``, else
    :data:`DEFAULT_DATA_DIR`."""
    return Path(given or configured or DEFAULT_DATA_DIR)


def with_token(settings: Any, data_dir: str | os.PathLike[str] | None = None) -> Any:
    """``settings`` with ``review.token`` set from the data dir's admin token when none is set
    (a copy; the token is never printed). The refresh, the pull flow (a scheduled deployment
    has no CLI to pass it), `review push|pull` and `forget` all take it this way."""
    if settings.review.token:
        return settings
    token = read_token(data_dir_of(data_dir, settings.review.data_dir))
    if not token:
        return settings
    settings = settings.model_copy(deep=True)
    settings.review.set_token(token)
    return settings


class _BoundedHTTPServer(HTTPServer):
    """One thread per connection, at most ``max_threads`` at once: a connection that arrives
    while all are busy is answered 503 at once and closed (never queued behind slow clients,
    never a new thread)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, max_threads: int) -> None:
        super().__init__(address, handler)
        self.max_threads = max_threads
        self._slots = threading.BoundedSemaphore(max_threads)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        t = threading.Thread(
            target=self._serve_one,
            args=(request, client_address),
            name="ls-webhook-handler",
            daemon=True,
        )
        try:
            t.start()
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("webhook: error serving %s", client_address, exc_info=True)


class WebhookReceiver:
    """A tiny HTTP server on 127.0.0.1 for Label Studio webhooks.

    Requests must carry ``Authorization: Bearer <secret>`` (Label Studio sends the headers
    given at webhook registration). On ``ANNOTATION_CREATED``/``ANNOTATION_UPDATED`` it calls
    ``on_change(payload)`` in one worker thread; events that arrive while a call runs are
    coalesced into one more call, so a burst of answers triggers at most two pulls.

    Bounded: a body over ``max_body`` bytes is refused with 413 before it is read (a missing or
    malformed Content-Length with 411/400); a connection idle for ``idle_timeout_s`` (nothing
    received) is closed, and so is one that has not sent its request line, headers and the
    right token within ``header_deadline_s`` of connecting (a client sending a header line every
    few seconds kept its slot forever: eight such held every slot without the token); at most
    ``max_threads`` connections are served at once, more are answered 503 without a thread.
    """

    PATH = "/labelstudio/webhook"
    ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
    MAX_BODY = 1 << 20  # Label Studio's annotation payloads are a few KiB
    IDLE_TIMEOUT_S = 10.0
    HEADER_DEADLINE_S = 10.0
    MAX_THREADS = 8

    def __init__(
        self,
        on_change: Callable[[dict[str, Any]], Any],
        secret: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body: int = MAX_BODY,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        header_deadline_s: float = HEADER_DEADLINE_S,
        max_threads: int = MAX_THREADS,
    ) -> None:
        self._on_change = on_change
        self._secret = secret
        self._pending = threading.Event()
        self._stop = threading.Event()
        self.calls = 0
        self.errors = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout_s  # socket timeout: an idle connection is closed

            def setup(self) -> None:
                super().setup()
                # Until the token is checked, the connection lives header_deadline_s at most.
                self._deadline = threading.Timer(header_deadline_s, self._expire)
                self._deadline.daemon = True
                self._deadline.start()

            def _expire(self) -> None:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                self._deadline.cancel()
                super().finish()

            def _refuse(self, code: int) -> None:
                self.close_connection = True
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            def do_POST(self) -> None:
                auth = self.headers.get("Authorization", "")
                if not hmac.compare_digest(auth, f"Bearer {receiver._secret}"):
                    self._refuse(401)
                    return
                self._deadline.cancel()
                if self.path != receiver.PATH:
                    self._refuse(404)
                    return
                raw = self.headers.get("Content-Length")
                if raw is None:
                    self._refuse(411)
                    return
                try:
                    length = int(raw)
                except ValueError:
                    self._refuse(400)
                    return
                if length < 0:
                    self._refuse(400)
                    return
                if length > max_body:
                    self._refuse(413)
                    return
                try:
                    payload = json.loads(self.rfile.read(length) or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self._refuse(400)
                    return
                if not isinstance(payload, dict):
                    self._refuse(400)
                    return
                if payload.get("action") in receiver.ACTIONS:
                    receiver._last = payload
                    receiver._pending.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("webhook: " + fmt, *args)

        self._last: dict[str, Any] = {}
        try:
            self.httpd = _BoundedHTTPServer((host, port), Handler, max(1, max_threads))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise ConfigError(
                f"port {port} on {host} is in use (another `review webhook`?): pick another "
                "with --port"
            ) from None
        self.url = f"http://{host}:{self.httpd.server_address[1]}{self.PATH}"
        self._threads = [
            threading.Thread(target=self.httpd.serve_forever, name="ls-webhook-http", daemon=True),
            threading.Thread(target=self._worker, name="ls-webhook-worker", daemon=True),
        ]

    def _worker(self) -> None:
        while not self._stop.is_set():
            if not self._pending.wait(timeout=0.2):
                continue
            self._pending.clear()
            try:
                self._on_change(self._last)
                self.calls += 1
            except Exception:  # a failed pull must not kill the receiver; the next event retries
                self.errors += 1
                log.exception("webhook-triggered pull failed; a later event or run catches up")

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and join both threads."""
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=30)
