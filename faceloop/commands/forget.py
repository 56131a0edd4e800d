"""``faceloop forget``: remove a person (an identity, an ID-card subject, an image) from the store.

``faceloop forget --identity ID --subject SUBJECT --image SHA256|URI [--yes] [--store|--config]``
(each repeatable) resolves the request to photos (storage/forget.plan), records what is left
to do in ``state/forget_pending.json`` (digests only, the tombstones to add included), adds
tombstones (keyed digests: the next refresh does not take those photos or that subject back
in), scrubs the store (storage/forget.scrub:
tables, review records and queue, every dataset version, reports, run records, staging), deletes
the person's Label Studio tasks through its API when it is reachable and appends one line to
``audit/forget.jsonl``. All of it under the store lock. When Label Studio is not reachable the
command says how many tasks are left, and ``faceloop forget --resume`` finishes (also any store
work an interrupted forget left).

A request that matches nothing in the store is only tombstoned (a subject's folder name, a
readable file's content: kept out from now on) and touches nothing else; one an earlier forget
carried out is noted as such.

Exit codes: 0 done (or nothing to do, or done before); 1 a request matched nothing, or Label
Studio tasks are left; 2 usage (no target, no --yes without a terminal, refused at the
prompt); 3 the store is locked.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from faceloop.config import Settings, load_settings
from faceloop.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from storage.forget import Plan
    from storage.privacy import Keyed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "forget",
        help="remove a person (identity, ID subject, image) from the store and Label Studio",
    )
    p.add_argument(
        "--identity",
        action="append",
        default=[],
        metavar="ID",
        help="identity id to forget with every photo showing it (repeatable)",
    )
    p.add_argument(
        "--subject",
        action="append",
        default=[],
        metavar="SUBJECT_ID",
        help="ID-card subject (folder name) to forget, and keep out (repeatable)",
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="SHA256|URI",
        help="image to forget, by content sha256 or path/URI (a path: the photo there now and "
        "its earlier edited versions, not a photo moved away from it); every copy goes "
        "(repeatable)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish what an earlier forget left (Label Studio tasks, interrupted store work)",
    )
    p.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (needed without a tty)"
    )
    p.add_argument(
        "--lift-subject",
        action="append",
        default=[],
        metavar="SUBJECT_ID",
        help="undo the tombstone of an ID-card subject's folder name (a mistyped --subject): "
        "the next refresh takes a folder of that name in again, except photos whose content a "
        "forget tombstoned (those of a subject that was really forgotten) (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="say what the request would remove (photos, faces, Label Studio tasks) and change "
        "nothing",
    )
    p.add_argument("--store", help="store root: a directory or s3://bucket/prefix")
    p.add_argument("--config", help="YAML config supplying the store and Label Studio settings")
    p.set_defaults(func=cmd_forget)


def _confirm(args: argparse.Namespace, store_uri: str) -> bool:
    if args.yes:
        return True
    what = []
    for kind in ("identity", "subject", "image"):
        n = len(getattr(args, kind))
        if n:
            what.append(f"{n} {kind}{'ies' if kind == 'identity' and n > 1 else ''}")
    if not sys.stdin.isatty():
        print(
            "faceloop: error: forget deletes data for good; pass --yes (stdin is not a terminal)",
            file=sys.stderr,
        )
        return False
    text = ", ".join(what) or "pending work"
    answer = input(
        f"Forget {text} in {store_uri} for good (--dry-run shows what goes)? Type 'yes': "
    )
    return answer.strip().lower() == "yes"


def delete_labelstudio_tasks(
    settings: Settings, tasks: set[tuple[int, int]]
) -> tuple[int, set[tuple[int, int]], str | None]:
    """Delete ``(project, task)`` pairs through Label Studio's API: (deleted, left, why left)."""
    if not tasks:
        return 0, set(), None
    from annotate import server
    from annotate.client import ReviewClient
    from annotate.server import LabelStudioUnavailable
    from faceloop.localnet import health

    url = settings.review.url
    if not health(url):
        return 0, set(tasks), f"Label Studio not reachable at {url}"
    token = server.with_token(settings).review.token_value()
    try:
        client = ReviewClient(settings.review, token=token)
    except LabelStudioUnavailable as exc:
        return 0, set(tasks), str(exc)
    left = set(tasks)
    deleted = 0
    try:
        for pair in sorted(tasks):
            if client.delete_task(pair[1]):
                deleted += 1
            left.discard(pair)
    except LabelStudioUnavailable as exc:
        return deleted, left, str(exc)
    return deleted, left, None


_NOT_FOUND = {
    "identity": "check the id (`faceloop explain FACE_ID` names a face's identity)",
    "subject": "its folder name would be tombstoned: no refresh takes it in",
    "image": "no file there, and no image with that URI or sha256 in the store",
}


def _dry_run(args: argparse.Namespace, store: Any) -> int:
    """What the request would remove, counted; nothing is written (no lock either: a refresh
    running now may change the answer)."""
    from storage.forget import plan
    from storage.privacy import Keyed, read_pending

    if args.resume:
        # What `--resume` would finish: a killed forget's store work, its audit line, the
        # Label Studio tasks left (counts: the record holds keyed digests only).
        pending = read_pending(store)
        if pending is None:
            print("nothing to resume")
        else:
            print(
                "would resume a forget: "
                + ("its store work, " if not pending.store_done else "")
                + f"{len(pending.ls_tasks)} Label Studio tasks to delete"
                + (
                    f", the audit line of {len(pending.requests)} request(s)"
                    if pending.requests
                    else ""
                )
            )
        if not (args.identity or args.subject or args.image):
            print("dry run: nothing was changed")
            return EXIT_OK
    if not (args.identity or args.subject or args.image):
        print("nothing asked: give --identity, --subject or --image (or --resume)")
        return EXIT_USAGE
    p = plan(store, args.identity, args.subject, args.image)
    print(
        f"would forget {len(p.shas)} images with {len(p.face_ids)} faces (everyone on those "
        f"photos), {len(p.task_keys)} review tasks ({len(p.ls_tasks)} in Label Studio)"
    )
    if p.claimants:
        print(f"{len(p.claimants)} other ID-card subject(s) would be decided again (a claim)")
    already = _carried_out(store, Keyed.of(store, create=False), p)
    _say_carried_out(already)
    missing = 0
    for kind, n in sorted(_still_missing(p.not_found, already).items()):
        if kind == "image_content_only":
            print(f"note: {n} image(s) not in the store: their content would be tombstoned")
            continue
        missing += n
        print(
            f"warning: nothing found for {n} {kind} request(s): {_NOT_FOUND[kind]}",
            file=sys.stderr,
        )
    print("dry run: nothing was changed")
    return EXIT_FAILED if missing else EXIT_OK


def _carried_out(
    store: Any, keyed: Any, p: Any, earlier: Iterable[dict[str, Any]] = ()
) -> list[tuple[str, str]]:
    """The requests of plan ``p`` that found nothing because an earlier forget carried them out
    (its audit names them as found, or the subject is tombstoned). A forget killed before its
    audit line is known by the request it recorded as pending (``earlier``: those this run
    finishes) and, once finished, by the ``resumed`` requests of the line that finished it:
    a repeat of it said "nothing found ... check the id" (exit 1) for good."""
    from storage.privacy import TombstoneCheck, read_audit

    if keyed is None or not p.missing:
        return []

    def found(requests: Iterable[Any]) -> set[str]:
        return {
            t
            for r in requests
            if isinstance(r, dict) and any((r.get("found") or {}).values())
            for t in r.get("targets", [])
        }

    lines = read_audit(store)
    done_before = {t for e in lines for t in e.get("found_targets", [])}
    done_before |= found(r for e in lines for r in e.get("resumed", []))
    done_before |= found(earlier)
    gone = TombstoneCheck(store)
    return [
        (kind, v)
        for kind, v in p.missing
        if keyed.digest("request", f"{kind}:{v}") in done_before
        or (kind == "subject" and gone and gone.subject(v))
    ]


def _say_carried_out(already: list[tuple[str, str]]) -> None:
    for kind in ("identity", "subject", "image"):
        if n := sum(k == kind for k, _ in already):
            print(f"note: {n} {kind} request(s) already carried out by an earlier forget")


def _request_fields(args: argparse.Namespace, keyed: Keyed, p: Plan | None) -> dict[str, Any]:
    """A request's audit fields: how many of each kind were asked, their keyed digests
    (provable with the store secret, not readable) and what they found."""
    return {
        "request": {
            "identity": len(args.identity),
            "subject": len(args.subject),
            "image": len(args.image),
        },
        "targets": sorted(
            [keyed.digest("request", f"identity:{v}") for v in args.identity]
            + [keyed.digest("request", f"subject:{v}") for v in args.subject]
            + [keyed.digest("request", f"image:{v}") for v in args.image]
        ),
        "found": {"images": len(p.shas), "faces": len(p.face_ids)} if p is not None else {},
    }


def _still_missing(not_found: dict[str, int], already: list[tuple[str, str]]) -> dict[str, int]:
    """``not_found``'s counts less the requests an earlier forget carried out."""
    left = {kind: n - sum(k == kind for k, _ in already) for kind, n in not_found.items()}
    return {kind: n for kind, n in left.items() if n > 0}


def _pool_shards(store: Any) -> set[str]:
    """The sha256 names of every dataset's pool shards (``datasets/<name>/shards/``)."""
    from storage import layout
    from storage.recovery import dataset_names

    return {
        o.rel.rsplit("/", 1)[-1].removesuffix(".parquet")
        for name in dataset_names(store)
        for o in store.list(layout.dataset_pool(name))
    }


def _drop_cached(shas: set[str]) -> int:
    """Remove the shards ``shas`` (replaced by the forget: they hold its faces) from this
    machine's reader cache (``$FACELOOP_CACHE_DIR``); how many were there."""
    from storage.dataset import default_cache_dir

    cache, n = default_cache_dir(), 0
    for sha in shas:
        path = cache / f"{sha}.parquet"
        if path.is_file():
            path.unlink(missing_ok=True)
            n += 1
    return n


def _lock(store: Any, settings: Settings, run_id: str) -> Any:
    """The store lock a forget (or a lift) holds while it writes."""
    from storage.lock import store_lock

    return store_lock(
        store,
        run_id,
        "forget",
        wait_seconds=settings.lock.wait_seconds,
        lease_seconds=settings.lock.lease_seconds,
    )


def _lift(args: argparse.Namespace) -> int:
    """Take subject folder names off the tombstones (audited). What was forgotten stays
    forgotten: only a folder of that name listed from now on is taken in."""
    from faceloop.commands import open_existing_store
    from faceloop.runids import new_run_id
    from storage.objectstore import use_store_modes
    from storage.privacy import (
        Keyed,
        audit,
        read_tombstones,
        subject_tombstone,
        write_tombstones,
    )

    settings = load_settings(args.config, **({"store": args.store} if args.store else {}))
    use_store_modes(settings)
    store = open_existing_store(settings.store)
    if not args.yes:
        if not sys.stdin.isatty():
            print("faceloop: error: pass --yes (stdin is not a terminal)", file=sys.stderr)
            return EXIT_USAGE
        n = len(args.lift_subject)
        if input(f"Take {n} subject name(s) in again? Type 'yes': ").strip().lower() != "yes":
            return EXIT_USAGE
    run_id = new_run_id()
    with _lock(store, settings, run_id):
        keyed = Keyed.of(store)
        assert keyed is not None
        tomb = read_tombstones(store)
        lifted = 0
        for name in args.lift_subject:
            marks = {subject_tombstone(keyed, name), keyed.digest("subject", name)}
            if marks & tomb.subjects:
                tomb.subjects -= marks
                lifted += 1
        if lifted:
            write_tombstones(store, tomb)
        audit(
            store,
            {
                "action": "lift",
                "run_id": run_id,
                "targets": sorted(
                    keyed.digest("request", f"subject:{v}") for v in args.lift_subject
                ),
                "lifted": lifted,
            },
        )
    print(f"lifted {lifted} subject tombstone(s)")
    if lifted < len(args.lift_subject):
        print(
            f"warning: {len(args.lift_subject) - lifted} name(s) had no tombstone",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    from faceloop.commands import open_existing_store
    from faceloop.runids import new_run_id
    from storage.forget import UNKNOWN_REQUEST, finish_store_work, plan, redact_claims
    from storage.objectstore import use_store_modes
    from storage.privacy import (
        Keyed,
        Pending,
        Tombstones,
        add_tombstones,
        audit,
        digests,
        read_pending,
        subject_tombstone,
        write_pending,
    )
    from storage.recovery import note_subjects_to_relabel, subjects_to_relabel

    if args.lift_subject:
        if args.identity or args.subject or args.image or args.resume or args.dry_run:
            print("faceloop: error: --lift-subject goes alone", file=sys.stderr)
            return EXIT_USAGE
        return _lift(args)
    if not (args.identity or args.subject or args.image or args.resume):
        print(
            "faceloop: error: name what to forget (--identity, --subject, --image) or --resume",
            file=sys.stderr,
        )
        return EXIT_USAGE
    settings = load_settings(args.config, **({"store": args.store} if args.store else {}))
    use_store_modes(settings)
    # a mistyped path would get the tombstones, and the person would stay in the real store
    store = open_existing_store(settings.store)
    if args.dry_run:
        return _dry_run(args, store)
    if not _confirm(args, store.uri("")):
        return EXIT_USAGE
    run_id = new_run_id()
    removed: dict[str, Any] = {}
    with _lock(store, settings, run_id) as lock:
        keyed = Keyed.of(store)
        assert keyed is not None
        pending = read_pending(store) or Pending(store_done=True)
        resuming = not pending.store_done  # an earlier forget's store work is left
        if args.resume and not pending and not (args.identity or args.subject or args.image):
            print("nothing to resume")
            return EXIT_OK
        p = None
        already: list[tuple[str, str]] = []  # requests an earlier forget carried out
        # Killed forgets whose store work this one finishes: what they had asked.
        earlier = list(pending.requests)
        if args.identity or args.subject or args.image:
            p = plan(store, args.identity, args.subject, args.image)
            already = _carried_out(store, keyed, p, earlier)
            new = Tombstones(
                digests(keyed, "image", p.shas),
                {subject_tombstone(keyed, s) for s in p.subjects},
                digests(keyed, "face", p.face_ids),
            )
        if p is not None and not p.tokens:
            # Nothing of it in the store: only kept out from now on (a subject not taken in
            # yet, a photo's content); no store work, the derived caches stay.
            add_tombstones(store, new)
        elif p is not None:
            pending.tokens |= digests(keyed, "token", p.tokens)
            pending.ls_tasks |= p.ls_tasks
            pending.tombstones.images |= new.images
            pending.tombstones.subjects |= new.subjects
            pending.tombstones.faces |= new.faces
            pending.store_done = False
            pending.requests.append(_request_fields(args, keyed, p))
            if p.first_run and (not pending.reports_from or p.first_run < pending.reports_from):
                pending.reports_from = p.first_run
            # Subjects whose duplicate claim rested on these photos are decided again by the
            # next refresh (a subject left with nothing is not, and leaves the record). Before
            # the pending record: a forget killed after it would otherwise never decide them
            # again nor take the forgotten subject's pseudonym out of their reasons.
            note_subjects_to_relabel(
                store, (subjects_to_relabel(store) | p.claimants) - p.subjects_gone
            )
            # The pending record first: a forget killed from here on is finished, tombstones
            # included, by --resume or the next refresh (and `doctor` says one is pending).
            write_pending(store, pending)
            # Tombstones: from here on no refresh takes these photos back in.
            add_tombstones(store, new)
        pooled = _pool_shards(store) if not pending.store_done else set()
        try:
            # A new request redacts its own claim names below; an earlier one killed before
            # its redaction is redacted by what the subjects' reasons name.
            removed = finish_store_work(
                store, pending, lock.check, redact_stale=resuming or p is None
            )
            if pooled and (dropped := _drop_cached(pooled - _pool_shards(store))):
                removed["cached_shards_dropped"] = dropped
        except BaseException:  # (Ctrl-C and SIGTERM too: the hint is theirs as well)
            if pending.store_done:
                raise
            # Recorded as pending before the store work began: nothing of it is lost.
            print(
                "faceloop: the forget stopped before its store work was done; it is recorded "
                "as pending: `faceloop forget --resume` (or the next refresh) finishes it",
                file=sys.stderr,
            )
            raise
        if p is not None and p.claimants:
            removed["claim_reasons_redacted"] = removed.get(
                "claim_reasons_redacted", 0
            ) + redact_claims(store, p.claimants, p.claim_names)
        ls_deleted, left, why = delete_labelstudio_tasks(settings, pending.ls_tasks)
        pending.ls_tasks = left
        entry: dict[str, Any] = {
            "action": "forget" if p is not None else "resume",
            "run_id": run_id,
            **_request_fields(args, keyed, p),
            # The requests that matched something: a later repeat of one is "already
            # forgotten", not "nothing found".
            "found_targets": sorted(
                keyed.digest("request", f"{kind}:{v}")
                for kind, values in (
                    ("identity", args.identity),
                    ("subject", args.subject),
                    ("image", args.image),
                )
                for v in values
                if p is not None and (kind, v) not in p.missing
            ),
            # A repeat of a finished request is "already done", not "not found".
            "not_found": _still_missing(p.not_found, already) if p is not None else {},
            "already_done": dict(Counter(kind for kind, _ in already)),
            "removed": removed,
            "labelstudio": {"deleted": ls_deleted, "left": len(left)},
        }
        if resuming or earlier:
            # What the killed forget(s) had asked (their own line was never written: killed
            # in their store work, or after it and before the line).
            entry["resumed"] = earlier or [UNKNOWN_REQUEST]
        # The line before the record loses the requests: a kill between the two repeats the
        # line at the next resume rather than losing it.
        audit(store, entry)
        pending.requests = []
        write_pending(store, pending)
    missing = 0
    if p is not None:
        print(f"forgot {len(p.shas)} images with {len(p.face_ids)} faces")
        _say_carried_out(already)
        for kind, n in sorted(_still_missing(p.not_found, already).items()):
            if kind == "image_content_only":
                print(
                    f"note: {n} image(s) not in the store: their content is tombstoned, so no "
                    "refresh takes them in"
                )
                continue
            missing += n
            after = _NOT_FOUND[kind].replace("would be", "is")
            print(f"warning: nothing found for {n} {kind} request(s): {after}", file=sys.stderr)
    if p is not None and p.claimants:
        print(
            f"{len(p.claimants)} other ID-card subject(s) had a duplicate claim with it: "
            "the next refresh decides them again"
        )
    if removed:
        done = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in removed.items() if v)
        print(f"removed: {done or 'nothing'}")
    if ls_deleted:
        print(f"deleted {ls_deleted} Label Studio tasks")
    if left:
        print(
            f"left: {len(left)} Label Studio tasks ({why}); run `faceloop forget --resume` "
            "when it is reachable"
        )
        return EXIT_FAILED
    return EXIT_FAILED if missing else EXIT_OK
