"""``faceloop review up|down|push|pull|webhook``: human review in Label Studio."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import secrets
import signal
import sys
import threading
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from faceloop.commands import open_existing_store, port
from faceloop.config import Settings, load_settings

if TYPE_CHECKING:
    from annotate.client import ReviewClient

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="human review in Label Studio")
    rsub = p.add_subparsers(dest="review_cmd", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--config", help="YAML config (default: built-in defaults and FACELOOP_* variables)"
        )
        q.add_argument("--store", help="override the store (default: store of the config)")
        q.add_argument(
            "--data-dir", default=None, help="Label Studio data dir (default var/labelstudio)"
        )

    up = rsub.add_parser(
        "up", help="install (once) and start Label Studio on 127.0.0.1, create the projects"
    )
    common(up)
    up.add_argument(
        "--allow-local-webhooks",
        action="store_true",
        help=(
            "opt-in, unsafe with untrusted annotators: turn Label Studio's SSRF protection off "
            "for all accounts so `review webhook` on this host gets events (default: off; "
            "answers are pulled by `review pull` or the review-pull deployment)"
        ),
    )
    up.set_defaults(func=cmd_up)
    down = rsub.add_parser("down", help="stop the Label Studio started by `review up`")
    common(down)
    down.set_defaults(func=cmd_down)
    add = rsub.add_parser(
        "add-annotator", help="give an annotator a Label Studio login (signup is closed)"
    )
    common(add)
    add.add_argument("email", help="the annotator's login e-mail address")
    add.set_defaults(func=cmd_add_annotator)
    push = rsub.add_parser("push", help="push status=review faces as tasks (idempotent)")
    common(push)
    push.set_defaults(func=cmd_push)
    pull = rsub.add_parser("pull", help="pull new answers, apply them and propagate")
    common(pull)
    pull.set_defaults(func=cmd_pull)
    hook = rsub.add_parser(
        "webhook",
        help=(
            "receive ANNOTATION_CREATED webhooks and pull on each (needs Label Studio started "
            "with --allow-local-webhooks; `review pull` needs nothing switched off)"
        ),
    )
    common(hook)
    hook.add_argument("--port", type=port, default=8765, help="port of the receiver on 127.0.0.1")
    hook.set_defaults(func=cmd_webhook)


def _settings(args: argparse.Namespace) -> Settings:
    from annotate import server

    # The token `review up` generated (mode 600 in the data dir); never printed.
    return server.with_token(load_settings(args.config, store=args.store), args.data_dir)


def _port(settings: Settings) -> int:
    return urlparse(settings.review.url).port or 8080


def cmd_up(args: argparse.Namespace) -> int:
    from annotate import server
    from annotate.client import ReviewClient
    from annotate.review import TASK_KINDS

    settings = load_settings(args.config, store=args.store)
    data_dir = server.data_dir_of(args.data_dir, settings.review.data_dir)
    if args.allow_local_webhooks:
        print(server.LOCAL_WEBHOOKS_WARNING, file=sys.stderr)
    if not server.installed():
        print("installing Label Studio into .venv-labelstudio (a few minutes, once)")
        server.install()
    info = server.start(
        data_dir,
        _port(settings),
        token=settings.review.token_value(),
        allow_local_webhooks=args.allow_local_webhooks,
    )
    from storage.identity import store_scope
    from storage.objectstore import open_store

    client = ReviewClient(settings.review, url=info.url, token=info.token)
    scope = store_scope(open_store(settings.store))
    for kind in TASK_KINDS:
        client.ensure_project(kind, scope)
    print(f"Label Studio is up: {info.url}")
    print("  login: admin@faceloop.local (or $LS_ADMIN_EMAIL)")
    print(f"  password: in {info.password_file} (mode 600)")
    print(
        f"  API token: in {data_dir / 'admin-token'}; "
        "`faceloop review push|pull` read it from there"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from annotate import server

    settings = load_settings(args.config, store=args.store)
    server.stop(server.data_dir_of(args.data_dir, settings.review.data_dir), _port(settings))
    print("Label Studio stopped")
    return 0


def cmd_add_annotator(args: argparse.Namespace) -> int:
    from annotate import server

    settings = load_settings(args.config, store=args.store)
    who = server.add_annotator(
        args.email, server.data_dir_of(args.data_dir, settings.review.data_dir)
    )
    print(f"{'created' if who.created else 'updated'} {who.email} on {settings.review.url}")
    print(f"  password: in {who.password_file} (mode 600); hand it over out of band")
    print(f"  API token: in {who.token_file} (mode 600)")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from annotate.sync import push_review
    from faceloop.runids import new_run_id
    from flows.review import review_lock

    settings = _settings(args)
    if not settings.review.enabled:
        print("review is off (review.enabled: false): nothing to push")
        return 0
    store = open_existing_store(settings.store)  # before the lock: no state folder at a typo
    # Under the store lock, as the refresh's own push and the pull's re-asks are: two pushes at
    # once would both find a key unpushed and create its task twice.
    with review_lock(settings, new_run_id()):
        res = push_review(settings, store)
    print(json.dumps(asdict(res), indent=2))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from annotate.sync import pull_and_apply
    from faceloop.logs import quiet_prefect_logs
    from flows.review import publish_after_review, review_lock

    quiet_prefect_logs()
    from faceloop.runids import new_run_id

    settings = _settings(args)
    if not settings.review.enabled:
        # As the scheduled review-pull deployment does (a cron's `review pull` failed, asking
        # for a Label Studio token).
        print("review is off (review.enabled: false): nothing to pull")
        return 0
    store = open_existing_store(settings.store)  # before the lock: no state folder at a typo
    run_id = new_run_id()
    with review_lock(settings, run_id):
        res = pull_and_apply(settings, store, run_id)
        out = _counts_only(asdict(res))
        if res.publishes:
            out["dataset"] = publish_after_review(settings, run_id)
    print(json.dumps(out, indent=2, default=str))
    return 0


def _counts_only(out: dict) -> dict:
    """A pull's result as printed: the faces settled per task key become counts. A task key
    names what it is about (an ID pair's subject id, face ids), and the output lands in
    terminals, cron mails and CI logs; the store's review records keep the keys."""
    per_answer = out.pop("settled_per_answer", {}) or {}
    # "faces": answered and propagated alike; "propagated": those near an answer's identity.
    propagated = out.pop("propagated", {}) or {}
    out["settled"] = {
        # Resolutions that settled a face in this pull: every recorded answer is applied again
        # at each pull (most change nothing), and counting them all read as new work done.
        "answers": sum(1 for n in per_answer.values() if n),
        "faces": sum(per_answer.values()),
        "propagated": sum(propagated.values()) if isinstance(propagated, dict) else propagated,
    }
    report = out.get("report")
    if isinstance(report, dict) and isinstance(report.get("settled"), dict):
        report["settled"] = sum(report["settled"].values())
    return out


def cmd_webhook(args: argparse.Namespace) -> int:
    from annotate import server
    from annotate.client import ReviewClient
    from annotate.records import read_task_records
    from annotate.sync import pull_and_apply
    from faceloop.runids import new_run_id

    settings = _settings(args)
    store = open_existing_store(settings.store)
    client = ReviewClient(settings.review)
    secret = secrets.token_hex(16)

    def on_change(_payload: dict) -> None:
        from faceloop.logs import quiet_prefect_logs
        from flows.review import publish_after_review, review_lock

        quiet_prefect_logs()
        run_id = new_run_id()
        with review_lock(settings, run_id):
            res = pull_and_apply(settings, store, run_id, client)
            settled = sum(res.settled_per_answer.values())
            print(f"pulled {res.new_answers} answers; {settled} faces settled", flush=True)
            ds = publish_after_review(settings, run_id) if res.publishes else None
        if ds:
            print(f"published {ds['name']} v{ds['version']} ({ds['num_rows']} faces)", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with server.WebhookReceiver(on_change, secret, port=args.port) as rx:
        projects = {r["project_id"] for r in read_task_records(store).to_pylist()}
        from annotate.review import TASK_KINDS
        from storage.identity import store_scope

        scope = store_scope(store)
        projects |= {client.ensure_project(k, scope) for k in TASK_KINDS}
        for pid in sorted(projects):
            # A new secret each start: drop our old hook for this URL and register afresh.
            for h in client.call("list webhooks", partial(_list_hooks, client, pid)):
                if h.url == rx.url:
                    client.call("delete webhook", partial(client.sdk.webhooks.delete, id=h.id))
            client.ensure_webhook(pid, rx.url, secret)
        print(f"listening on {rx.url} for {len(projects)} projects; Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()
    return 0


def _list_hooks(client: ReviewClient, project: int) -> list[Any]:
    return list(client.sdk.webhooks.list(project=str(project)))
