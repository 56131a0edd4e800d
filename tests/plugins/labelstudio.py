"""Session fixture: a real Label Studio on a free 127.0.0.1 port with a temporary data dir.

Installs Label Studio into <repo>/.venv-labelstudio when missing (scripts/labelstudio.sh install;
.ci/run does the same up front). Stops the server, and every process of its group, on teardown.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from annotate import server
from faceloop.localnet import free_port


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[server.ServerInfo]:
    """A running Label Studio: ``.url``, ``.token`` (admin), ``.data_dir``, ``.port``.

    Webhooks to 127.0.0.1 are allowed (SSRF protection off) because the webhook test's
    receiver lives on this machine; the server itself binds 127.0.0.1 only.
    """
    if not server.installed():
        server.install()
    data_dir = tmp_path_factory.mktemp("labelstudio")
    port = free_port()
    info = server.start(data_dir, port, token=secrets.token_hex(20), allow_local_webhooks=True)
    try:
        yield info
    finally:
        server.stop(data_dir, port)
