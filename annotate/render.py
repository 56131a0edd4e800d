"""Task rendering for Label Studio: what an annotator sees and how a click is read back.

Promises: one labelling config (XML) and one project title per task kind; :func:`build_task`
turns a :class:`annotate.review.ReviewItem` plus its face crops into a task payload (images as
JPEG data URIs, the item's key under :data:`KEY_FIELD`, one prediction with the model's
proposal); :func:`parse_annotation` turns an annotation of such a task back into an
:class:`annotate.review.Answer`. Pure: no network and no store; only PIL for the grids.

Images travel **inside the task as data URIs** (112x112 JPEG crops, or one grid JPEG per
identity): Label Studio needs no file serving (local-files serving stays off), no other file of
the machine or the store is reachable through it, it works the same with a local or an S3 store
and with a Label Studio on another host, and the crops are only shown to users logged into the
project. The price is task size (~6 KB per crop in base64), acceptable at review volumes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw

from annotate import review as rv

# The task data field that carries the item's key: how a task is found again (idempotent push,
# repair of an interrupted push, pull).
KEY_FIELD = "faceloop_key"
CELL = 112

# Label Studio's limit on a project title.
MAX_TITLE = 50

TITLES = {
    "idcard_pair": "ID card vs live photo",
    "cluster_check": "Cluster check",
    "duplicate": "Possible duplicate identities",
    "quality_check": "Usable for training?",
}

# One labelling config per kind. Choice values are the decisions of annotate/review.py.
LABEL_CONFIGS: dict[str, str] = {
    "idcard_pair": """<View>
  <Header value="Is the person on the ID card the same as in the live photo?"/>
  <View style="display:flex;gap:24px">
    <View><Header value="ID card" size="6"/><Image name="id_face" value="$id_image" width="224px"/></View>
    <View><Header value="Live photo" size="6"/><Image name="live_face" value="$live_image" width="224px"/></View>
  </View>
  <Choices name="decision" toName="live_face" choice="single" required="true" showInline="true">
    <Choice value="same_person" alias="same_person" hotkey="1"/>
    <Choice value="different_person" alias="different_person" hotkey="2"/>
    <Choice value="not_usable" alias="not_usable" hotkey="3"/>
  </Choices>
</View>""",  # noqa: E501 (markup kept on one line per element)
    "cluster_check": """<View>
  <Header value="$title"/>
  <Text name="hint" value="$hint"/>
  <Image name="grid" value="$grid"/>
  <Header value="Faces that do NOT belong (numbers):" size="6"/>
  <Choices name="outliers" toName="grid" choice="multiple" showInline="true" value="$faces"/>
  <Choices name="verdict" toName="grid" choice="single" required="true" showInline="true">
    <Choice value="all_belong" hotkey="1"/>
    <Choice value="marked_do_not_belong" hotkey="2"/>
  </Choices>
</View>""",
    "duplicate": """<View>
  <Header value="Are these two groups the same person?"/>
  <View style="display:flex;gap:24px">
    <View><Header value="$label_a" size="6"/><Image name="grid_a" value="$grid_a"/></View>
    <View><Header value="$label_b" size="6"/><Image name="grid_b" value="$grid_b"/></View>
  </View>
  <Choices name="decision" toName="grid_a" choice="single" required="true" showInline="true">
    <Choice value="same_person" hotkey="1"/>
    <Choice value="different_person" hotkey="2"/>
  </Choices>
</View>""",
    "quality_check": """<View>
  <Header value="$title"/>
  <Text name="hint" value="$hint"/>
  <View style="display:flex;gap:24px">
    <View><Header value="This face" size="6"/><Image name="face" value="$face" width="224px"/></View>
    <View><Header value="$label_refs" size="6"/><Image name="refs" value="$refs"/></View>
  </View>
  <Choices name="decision" toName="face" choice="single" required="true" showInline="true">
    <Choice value="usable" hotkey="1"/>
    <Choice value="not_usable" hotkey="2"/>
    <Choice value="different_person" hotkey="3"/>
  </Choices>
</View>""",  # noqa: E501
}


def project_title(prefix: str, kind: str, scope: str = "") -> str:
    """The title of the project that holds the tasks of ``kind`` for the store named by
    ``scope`` (``"<store name> <short store id>"``): every store has its own projects, so two
    stores (the tests and the demo, say) never write into one project."""
    title = TITLES[kind]
    if not scope:
        return f"{prefix}: {title}"[:MAX_TITLE]
    name, _, sid = scope.rpartition(" ")
    # Label Studio refuses titles over 50 characters: the store's name gives way first, then
    # the question's title; the store id (what keeps two stores apart) is kept.
    fixed = len(f"{prefix} [ {sid}]: ")
    title = title[: max(8, MAX_TITLE - fixed)]
    name = name[: max(0, MAX_TITLE - fixed - len(title))]
    where = f"{name} {sid}" if name else sid
    return f"{prefix} [{where}]: {title}"[:MAX_TITLE]


# -- images ---------------------------------------------------------------------------------


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def grid_jpeg(crops: Sequence[bytes], columns: int = 6, numbered: bool = True) -> bytes:
    """One JPEG with the crops in a grid, each numbered 1..N in its top-left corner."""
    n = max(1, len(crops))
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * CELL, rows * CELL), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for i, jpeg in enumerate(crops):
        x, y = (i % cols) * CELL, (i // cols) * CELL
        with Image.open(io.BytesIO(jpeg)) as im:
            canvas.paste(im.convert("RGB").resize((CELL, CELL)), (x, y))
        if numbered:
            draw.rectangle([x, y, x + 22, y + 14], fill=(0, 0, 0))
            draw.text((x + 3, y + 2), str(i + 1), fill=(255, 255, 0))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=88)
    return buf.getvalue()


# -- tasks ----------------------------------------------------------------------------------


def choice(name: str, to: str, values: Sequence[str]) -> dict[str, Any]:
    """One ``choices`` result, as in a prediction or an annotation."""
    return {"from_name": name, "to_name": to, "type": "choices", "value": {"choices": list(values)}}


def build_task(
    item: rv.ReviewItem, crops: Mapping[str, bytes], model_version: str
) -> dict[str, Any]:
    """The Label Studio task for ``item``: data (images as data URIs, the idempotency key) and
    one prediction with the model's proposal, its confidence and ``model_version``.

    ``score`` (task data and prediction) is the confidence in the proposal, [0, 1]: Label
    Studio orders by it lowest first, so the hardest questions come first. ``evidence`` is the
    similarity (or, for a quality check, the quality) the proposal rests on."""
    data: dict[str, Any] = {KEY_FIELD: item.key, "kind": item.kind, "score": round(item.score, 4)}
    if item.evidence is not None:
        data["evidence"] = round(float(item.evidence), 4)
    if item.kind == "idcard_pair":
        data["id_image"] = data_uri(crops[item.shown[0]])
        data["live_image"] = data_uri(crops[item.shown[1]])
        data["subject"] = item.subject or ""
        if item.reason:
            data["reason"] = item.reason
        result = [choice("decision", "live_face", [item.proposal])]
    elif item.kind == "cluster_check":
        data["grid"] = data_uri(grid_jpeg([crops[f] for f in item.shown]))
        data["faces"] = [{"value": str(i + 1)} for i in range(len(item.shown))]
        data["title"] = f"Identity {item.identity_ids[0]}: do all faces show the same person?"
        data["hint"] = "Tick the numbers of faces that do not belong, then choose a verdict."
        marked = [str(item.shown.index(f) + 1) for f in item.suspects if f in item.shown]
        result = [choice("verdict", "grid", [item.proposal])]
        if marked:  # pre-marked only where the model believes the face is someone else
            result.insert(0, choice("outliers", "grid", marked))
    elif item.kind == "quality_check":
        ident = item.identity_ids[0] if item.identity_ids else "?"
        data["face"] = data_uri(crops[item.shown[0]])
        refs = [crops[f] for f in item.shown[1:]] or [crops[item.shown[0]]]
        data["refs"] = data_uri(grid_jpeg(refs, 3, False))
        data["label_refs"] = f"Other faces of {ident}"
        data["title"] = f"Is this face of {ident} usable for training?"
        q = "" if item.evidence is None else f" (quality {item.evidence:.2f})"
        data["hint"] = (
            f"It matches {ident}; the crop scored low{q}. usable: clear enough to learn the "
            "person from; not_usable: blurred, tiny, cut off, not a face; different_person: "
            "not the person on the right."
        )
        result = [choice("decision", "face", [item.proposal])]
    else:
        a, b = item.identity_ids
        half = len(item.shown) // 2 or 1
        data["grid_a"] = data_uri(grid_jpeg([crops[f] for f in item.shown[:half]], 4, False))
        data["grid_b"] = data_uri(
            grid_jpeg([crops[f] for f in item.shown[half:]] or [crops[item.shown[0]]], 4, False)
        )
        data["label_a"], data["label_b"] = f"Identity {a}", f"Identity {b}"
        result = [choice("decision", "grid_a", [item.proposal])]
    return {
        "data": data,
        "predictions": [
            {"model_version": model_version, "score": float(item.score), "result": result}
        ],
    }


# -- annotations ----------------------------------------------------------------------------


def _annotator(ann: Mapping[str, Any]) -> str:
    """Who answered: the account's e-mail when the annotation says it, else the user id.

    Label Studio gives ``completed_by`` as an id and ``created_username`` as
    ``"<first> <last> <email>, <id>"``; an e-mail is what an operator recognises in an audit.
    """
    who = ann.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or who.get("id"))
    name = str(ann.get("created_username") or "").rpartition(",")[0]
    emails = [w for w in name.split() if "@" in w]
    return emails[-1] if emails else str(who)


def parse_annotation(ann: Mapping[str, Any], item: rv.ReviewItem, task_key: str) -> rv.Answer:
    """An annotation's result → :class:`annotate.review.Answer` (marked numbers → face ids)."""
    decision, marked = "", []
    stray = False  # a face number the task does not show (an API client, an edited config)
    for r in ann.get("result") or []:
        choices = (r.get("value") or {}).get("choices") or []
        if r.get("from_name") in ("decision", "verdict") and choices:
            decision = choices[0]
        elif r.get("from_name") == "outliers":
            for c in choices:
                if str(c).isdigit() and 1 <= int(c) <= len(item.shown):
                    marked.append(item.shown[int(c) - 1])
                else:
                    stray = True
    annotator = _annotator(ann)
    if decision not in rv.DECISIONS[item.kind] or stray:
        # Not an answer this task asks for: recorded verbatim, not understood, applied to
        # nothing (its marks with it: they go with a verdict).
        decision, marked = "", []
    if item.kind == rv.TaskKind.CLUSTER_CHECK and (
        (decision == rv.REMOVE_MARKED and not marked) or (decision == rv.CONFIRM and marked)
    ):
        # "Marked faces do not belong" with none marked (a number forgotten), or "all belong"
        # with faces marked: applied, either would make faces human that the annotator may
        # not have meant. Not understood: the task waits for a clear answer.
        decision, marked = "", []
    return rv.Answer(
        task_key=task_key,
        kind=item.kind,
        annotation_id=int(ann["id"]),
        annotator=annotator,
        updated_at=str(ann.get("updated_at") or ann.get("created_at")),
        decision=decision,
        marked=tuple(sorted(marked)),
        cancelled=bool(ann.get("was_cancelled")),
        created_at=str(ann.get("created_at") or ""),
    )
