"""ReviewClient's retry policy is the only one: each of its attempts is one HTTP request (the
Label Studio SDK retries on its own by default, which multiplied the attempts and the time a
dead server took to report). A real HTTP server on 127.0.0.1 answers 503 and counts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from annotate.client import ReviewClient
from annotate.server import LabelStudioUnavailable
from faceloop.config import ReviewSettings


class _Unavailable(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = b'{"detail": "down for maintenance"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def unavailable() -> Iterator[str]:
    _Unavailable.hits = 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_each_attempt_is_one_request(unavailable: str) -> None:
    settings = ReviewSettings(url=unavailable, token="t", retries=2, backoff_s=0.01)
    client = ReviewClient(settings)
    with pytest.raises(LabelStudioUnavailable, match="unavailable after 3 attempts"):
        client.call("list projects", lambda: list(client.sdk.projects.list()))
    assert _Unavailable.hits == 3


def test_the_token_comes_from_the_configured_data_dir(tmp_path, monkeypatch) -> None:
    """`review up --data-dir D` wrote its token in D; the refresh and the review-pull
    deployment read the repository's var/labelstudio (another Label Studio's token: 401, or
    none: every scheduled pull failed). review.data_dir names D for every reader."""
    from annotate import server
    from faceloop.config import load_settings

    monkeypatch.delenv("FACELOOP_REVIEW__TOKEN", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    d = tmp_path / "ls"
    d.mkdir()
    (d / "admin-token").write_text("tok-of-d\n")
    settings = load_settings(None, store=str(tmp_path / "s"), review={"data_dir": str(d)})
    assert server.with_token(settings).review.token_value() == "tok-of-d"
    assert settings.review.token is None  # a copy: the caller's settings stay as they were
    other = tmp_path / "other"
    other.mkdir()
    (other / "admin-token").write_text("tok-of-other")
    assert server.with_token(settings, other).review.token_value() == "tok-of-other"  # --data-dir
    given = load_settings(
        None, store=str(tmp_path / "s"), review={"data_dir": str(d), "token": "t"}
    )
    assert server.with_token(given).review.token_value() == "t"
    assert server.data_dir_of(None, None) == server.DEFAULT_DATA_DIR
