"""``faceloop status --store S``: where a store stands, at a glance.

The latest refresh's record (``runs/<run_id>.json``: its run id, when, the store's totals as that
run counted them; a run killed, stopped or failed after recording its images is the latest all
the same, shown interrupted, beside the totals of the newest run that finished), the newest
dataset version, the faces waiting for a person and whether the review queue is current, and
the store lock (free, or held by a running refresh). Read-only: it reads what the runs wrote and
never takes the lock nor recounts the faces table (a refresh or ``faceloop doctor`` do); review
answers applied since the last refresh are not in its totals.
``--json`` prints the same as one object. Counts and ids only, never paths of photos.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from faceloop.commands import open_existing_store, shown
from faceloop.config import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="where a store stands: its latest run, dataset version, review and lock"
    )
    p.add_argument("--store", help="store root: a directory or s3://bucket/prefix")
    p.add_argument("--config", help="YAML config supplying the default of --store")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)


def store_status(store: Any) -> dict[str, Any]:
    """The status object (module docstring)."""
    from storage import layout
    from storage.lock import lock_state
    from storage.manifest import latest_version
    from storage.recovery import dataset_names
    from storage.versions import load_manifest
    from tasks.summary import RunSummary, review_queue_current

    runs = sorted(
        o.rel for o in store.list(layout.RUNS, recursive=False) if o.rel.endswith(".json")
    )
    last: dict[str, Any] | None = None
    for rel in reversed(runs):  # the newest readable record (run ids sort by time)
        try:
            doc = json.loads(store.read_bytes(rel))
            if last is None and doc.get("interrupted"):
                # A run killed, stopped or failed after recording its images: its record says
                # so (storage.recovery.record_interrupted_run) and counts no totals. It is the
                # latest run all the same; the totals are the newest finished run's.
                last = {
                    "run_id": str(doc["run_id"]),
                    "interrupted": str(doc["interrupted"]),
                    "totals": None,
                    "totals_of": None,
                }
                continue
            summary = RunSummary.from_dict(doc)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            continue
        last = (last or {"run_id": summary.run_id, "interrupted": None}) | {
            "totals": summary.to_dict()["totals"],
            "totals_of": summary.run_id,
        }
        break
    datasets = []
    for name in dataset_names(store):
        try:
            v = latest_version(store, name)
        except ValueError:
            continue
        if v is None:
            continue
        m = load_manifest(store, name, v)
        datasets.append(
            {"name": name, "version": v, "num_rows": m.num_rows, "num_classes": m.num_classes}
        )
    queue: dict[str, Any] = {"waiting": None, "current": False}
    if store.exists(layout.REVIEW_QUEUE):
        queue["waiting"] = store.read_parquet(layout.REVIEW_QUEUE).num_rows
        queue["current"] = review_queue_current(store)
    lock = lock_state(store)
    holder = lock.get("holder") or {}
    return {
        "store": store.uri(""),
        "runs": len(runs),
        "latest_run": last,
        "datasets": datasets,
        "review_queue": queue,
        "lock": {"state": lock["state"], "reason": lock.get("reason"), "pid": holder.get("pid")},
    }


def render(st: dict[str, Any]) -> str:
    lines = [f"store:     {st['store']}"]
    last = st["latest_run"]
    if last is None:
        lines.append("runs:      none yet (`faceloop refresh` makes the first)")
    else:
        lines.append(f"runs:      {st['runs']}, the latest {last['run_id']}")
        if last["interrupted"]:
            lines.append(f"           interrupted: {last['interrupted']}")
        if last["totals"] is None:
            lines.append("totals:    none counted yet (no run has finished)")
        elif last["totals_of"] != last["run_id"]:
            lines.append(
                f"totals (as {last['totals_of']}, the latest run that finished, counted them):"
            )
        else:
            lines.append("totals (as the latest run counted them):")
        from dataclasses import fields

        from tasks.summary import StoreTotals, _label

        # As the refresh prints them: "quarantined (faces + images)", not a bare key.
        said = {f.name: _label(f) for f in fields(StoreTotals)}
        totals = last["totals"] or {}
        names = {k: said.get(k, k.replace("_", " ")) for k in totals}
        width = max((len(n) for n in names.values()), default=0)
        lines += [f"  {names[k].ljust(width)}  {v}" for k, v in totals.items()]
    if not st["datasets"]:
        lines.append("datasets:  none published yet")
    for d in st["datasets"]:
        lines.append(
            f"dataset:   {d['name']} v{d['version']}: {d['num_rows']} faces, "
            f"{d['num_classes']} identities"
        )
    q = st["review_queue"]
    if q["waiting"] is None:
        lines.append("review:    no review queue yet")
    else:
        note = "" if q["current"] else " (the faces changed since it was written: next refresh)"
        lines.append(f"review:    {q['waiting']} faces waiting for a person{note}")
    lock = st["lock"]
    lines.append(
        f"lock:      {lock['state']}" + (f" ({lock['reason']})" if lock.get("reason") else "")
    )
    return "\n".join(shown(line) for line in lines)


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, store=args.store)
    st = store_status(open_existing_store(settings.store))
    print(json.dumps(st, indent=2) if args.json else render(st))
    return 0
