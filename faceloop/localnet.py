"""The two network helpers the local services need (Label Studio, Prefect, test servers):
a free port on 127.0.0.1 and a ``/health`` probe. Only 127.0.0.1 is ever bound."""

from __future__ import annotations

import socket
import urllib.request


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
