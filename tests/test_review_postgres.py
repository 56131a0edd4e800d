"""Label Studio on PostgreSQL (`LS_DB=postgresql` + POSTGRE_*), against a real postgres server.

SQLite is the default; production review servers run on Postgres. The server here is a
throw-away cluster (initdb) on a free 127.0.0.1 port, stopped at the end.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from annotate import server, sync
from faceloop.config import load_settings
from faceloop.localnet import free_port
from storage.objectstore import open_store
from tests.test_review_labelstudio import _scene

pytestmark = pytest.mark.integration
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _pg(tool: str) -> str:
    found = shutil.which(tool) or (str(PG_BIN / tool) if (PG_BIN / tool).exists() else None)
    assert found, f"PostgreSQL's {tool} is not installed (Debian package postgresql)"
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    # Not under pytest's tmp dir: that is 0700 root, and the postgres user must reach its data.
    base = Path(tempfile.mkdtemp(prefix="faceloop-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    subprocess.run(
        _as_postgres(
            [_pg("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_postgres(
            [_pg("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield port
    finally:
        subprocess.run(
            _as_postgres([_pg("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_labelstudio_on_postgres_round_trip(postgres, tmp_path, monkeypatch):
    for k, v in {
        "LS_DB": "postgresql",
        "POSTGRE_HOST": "127.0.0.1",
        "POSTGRE_PORT": str(postgres),
        "POSTGRE_USER": "postgres",
        "POSTGRE_PASSWORD": "unused-trust-auth",
        "POSTGRE_NAME": "postgres",
    }.items():
        monkeypatch.setenv(k, v)
    if not server.installed():
        server.install()
    data_dir, port = tmp_path / "ls", free_port()
    info = server.start(data_dir, port, token=secrets.token_hex(20))
    try:
        settings = load_settings(
            store=str(tmp_path / "store"),
            review={
                "url": info.url,
                "token": info.token,
                "project_prefix": f"pg-{uuid.uuid4().hex[:6]}",
            },
        )
        store = open_store(settings.store)
        _scene(store)
        res = sync.push_review(settings, store)
        assert res.created == 3
        # The tasks live in Postgres, not in a SQLite file under the data dir.
        out = subprocess.run(
            [
                _pg("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(postgres),
                "-U",
                "postgres",
                "-tAc",
                "select count(*) from task",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        assert int(out.stdout.strip()) == 3
        assert not list(data_dir.rglob("*.sqlite3"))
    finally:
        server.stop(data_dir, port)
