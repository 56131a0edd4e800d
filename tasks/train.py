"""Train a face recognizer from a dataset version and export it as an insightface-style ONNX.

Closing the loop: published labels -> a recognizer trained on them -> (``faceloop models
register``) -> the next refresh re-embeds existing faces with it (:func:`reembed_faces`) and
re-labels them.

* Backbone: :class:`SmallFaceNet`, a deliberately small CNN (112x112 RGB -> 128-d or 512-d),
  fast enough to train on a CPU in seconds for smoke tests; on a GPU it runs unchanged.
* Head: :class:`PartialFCArcFace`, an ArcFace additive angular margin over a class-sampled
  softmax (Partial FC): each step uses the batch's classes plus random negatives, so the
  ``num_classes x dim`` weight matrix may be far larger than what one step touches. Its
  gradient is sparse (only the sampled rows) and it is updated by plain SGD, which keeps no
  per-class optimiser state: at 10^6 classes x 128-d the head is 512 MB of float32, at 512-d
  2 GB, and nothing else scales with the class count except one ``num_classes`` float vector
  per step used to draw negatives.
* Export: ``torch.onnx.export`` of the backbone with input ``(N, 3, 112, 112)`` float32 RGB,
  ``(x - 127.5) / 127.5`` and a raw (not normalised) embedding output, which is exactly what
  insightface's ``ArcFaceONNX`` feeds and expects (it swaps BGR->RGB and normalises itself),
  so ``insightface.model_zoo.get_model`` loads the file through the same code path as the
  shipped recognizers.

Identity ids stay stable across a re-embed: :func:`reembed_faces` changes only the
``embedding`` (and ``model``) columns; the re-labelling that follows clusters the new
embeddings and ``tasks.cluster.assign_identity_ids`` gives every new cluster the previous
identity id held by most of its faces, so an identity whose membership is unchanged keeps its id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from faceloop.errors import BadInputError, ConfigError
from storage.dataset import FaceShardDataset

log = logging.getLogger(__name__)

ONNX_INPUT = "input.1"  # the name insightface's own recognizers use
ONNX_OUTPUT = "embedding"


# ---------------------------------------------------------------------------------------------
# Model


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))


class SmallFaceNet(nn.Module):
    """112x112 RGB (normalised) -> ``dim`` embedding. Four stride-2 conv blocks (56, 28, 14, 7)
    and a linear projection of the 7x7 map, as in ArcFace's "E" output layer (BN, dropout,
    FC, BN): the spatial layout of a face carries identity, so no global pooling."""

    def __init__(self, dim: int = 128, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w, 2), _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w, 1),
            _conv_bn(2 * w, 4 * w, 2), _conv_bn(4 * w, 4 * w, 1), _conv_bn(4 * w, 8 * w, 2),
        )
        self.bn = nn.BatchNorm2d(8 * w)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(8 * w * 7 * 7, dim)
        self.out = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.features(x))
        return self.out(self.fc(self.dropout(torch.flatten(x, 1))))


class PartialFCArcFace(nn.Module):
    """ArcFace loss ``-log softmax(s * cos(theta_y + m))`` over a sample of the classes.

    Each call uses every class present in ``labels`` plus random other classes up to
    ``max(ceil(sample_rate * num_classes), #positives)``; ``sample_rate=1`` is the full
    softmax. The weight rows are looked up with ``sparse=True``, so the gradient (and an SGD
    step) touches only the sampled rows.
    """

    def __init__(self, num_classes: int, dim: int, *, sample_rate: float = 0.1, scale: float = 64.0,
                 margin: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError("the dataset has no classes")
        if not 0 < sample_rate <= 1:
            raise ConfigError("sample_rate must be in (0, 1]")
        self.num_classes, self.dim = num_classes, dim
        self.sample_rate, self.scale, self.margin = sample_rate, scale, margin
        self.num_sample = min(num_classes, max(1, math.ceil(sample_rate * num_classes)))
        self.weight = nn.Parameter(torch.empty(num_classes, dim).normal_(0.0, 0.01))

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(class ids used this step, sorted; labels re-indexed into them)``."""
        if self.num_sample >= self.num_classes:
            return torch.arange(self.num_classes, device=labels.device), labels
        positives = torch.unique(labels)
        k = max(self.num_sample, len(positives))
        # Positives get a score above any random one, so top-k keeps them all (Partial FC's trick).
        score = torch.rand(self.num_classes, device=labels.device, generator=generator)
        score[positives] = 2.0
        index = torch.sort(torch.topk(score, k, sorted=False).indices).values
        return index, torch.searchsorted(index, labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        index, local = self.sample(labels, generator)
        w = F.embedding(index, self.weight, sparse=True)
        cos = F.linear(F.normalize(embeddings), F.normalize(w)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, local[:, None])
        theta = torch.acos(target)
        # Past pi - m, cos(theta + m) would rise again; use the usual linear fallback there.
        with_margin = torch.where(theta + self.margin < math.pi, torch.cos(theta + self.margin),
                                  target - self.margin * math.sin(self.margin))
        logits = cos.scatter(1, local[:, None], with_margin) * self.scale
        return F.cross_entropy(logits, local)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """What ``faceloop train`` can set. Defaults are for a real run; tests shrink them."""

    epochs: int = 10
    batch_size: int = 128
    embedding_dim: int = 128
    width: int = 16  # channels of the first conv block (doubles three times)
    lr: float = 1e-3  # backbone, AdamW
    head_lr: float = 0.1  # class weights, plain SGD on sparse rows
    weight_decay: float = 5e-4
    sample_rate: float = 0.1
    scale: float = 64.0
    margin: float = 0.5
    seed: int = 0
    num_workers: int = 0
    shuffle_window: int = 4
    device: str = "auto"  # "auto": CUDA when available, else CPU
    max_steps: int | None = None  # stop early (smoke tests, benchmarks)


@dataclass
class TrainResult:
    """What a training run produced and how it went."""

    onnx_path: str
    sha256: str
    info_path: str
    device: str
    dataset: dict[str, Any]
    loss_before: float
    loss_after: float
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    # Training on top of an embedder: mean same- minus different-identity cosine on the data,
    # base model vs adapted model (None for a backbone trained from scratch).
    separation_before: float | None = None
    separation_after: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate_loss(model: nn.Module, head: PartialFCArcFace, dataset: FaceShardDataset,
                  device: torch.device, batch_size: int = 256, max_batches: int | None = None) -> float:
    """Mean ArcFace loss over the dataset (this rank's part, epoch 0 order), model in eval
    mode, negatives drawn from a fixed-seed generator so two calls compare like for like."""
    was_training = model.training
    model.eval()
    dataset.set_epoch(0)
    gen = torch.Generator(device=device).manual_seed(1234)
    total, n = 0.0, 0
    for i, (x, y) in enumerate(DataLoader(dataset, batch_size=batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        total += head(model(x), y, gen).item() * len(y)
        n += len(y)
    model.train(was_training)
    return total / max(n, 1)


def _step(loss: torch.Tensor, *optimizers: torch.optim.Optimizer) -> float:
    """One optimisation step of every optimiser on ``loss``; the loss value."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return float(loss.item())


def _dataset_info(ds: FaceShardDataset, name: str) -> dict[str, Any]:
    """What a trained model records of the dataset version it was trained on."""
    return {"store": ds.info.store_root, "name": name, "version": ds.info.version,
            "num_rows": ds.info.num_rows, "num_classes": ds.num_classes}


def train(store_root: str, dataset_name: str, out_dir: str | Path, version: int | None = None,
          config: TrainConfig | None = None) -> TrainResult:
    """Train :class:`SmallFaceNet` + :class:`PartialFCArcFace` on a dataset version, export the
    backbone to ``<out_dir>/recognizer.onnx`` and describe it in ``recognizer.json`` (sha256,
    dataset name/version, embedding size, training numbers), which ``faceloop models
    register`` reads. Deterministic on CPU for a given seed."""
    cfg = config or TrainConfig()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ds = FaceShardDataset(store_root, dataset_name, version, seed=cfg.seed, batch_size=cfg.batch_size,
                          shuffle_window=cfg.shuffle_window)
    if ds.info.num_rows == 0:
        raise ConfigError(f"dataset {dataset_name!r} v{ds.info.version} is empty")
    model = SmallFaceNet(cfg.embedding_dim, cfg.width).to(device)
    head = PartialFCArcFace(ds.num_classes, cfg.embedding_dim, sample_rate=cfg.sample_rate,
                            scale=cfg.scale, margin=cfg.margin).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head_opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    log.info("training on %s: %d rows, %d classes (%d sampled per step), %d epochs",
             device, ds.info.num_rows, ds.num_classes, head.num_sample, cfg.epochs)

    loss_before = evaluate_loss(model, head, ds, device)
    epoch_losses: list[float] = []
    steps = images = 0
    seconds = 0.0
    for epoch in range(cfg.epochs):
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda")
        model.train()
        run, n = 0.0, 0
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            run += _step(head(model(x), y, gen), opt, head_opt) * len(y)
            n += len(y)
            steps += 1
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        images += n
        epoch_losses.append(run / max(n, 1))
        log.info("epoch %d: loss %.4f (%d images)", epoch, epoch_losses[-1], n)
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    loss_after = evaluate_loss(model, head, ds, device)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "recognizer.onnx"
    sha = export_onnx(model, onnx_path)
    dataset = _dataset_info(ds, dataset_name)
    result = TrainResult(
        onnx_path=str(onnx_path), sha256=sha, info_path=str(out / "recognizer.json"),
        device=str(device), dataset=dataset, loss_before=loss_before, loss_after=loss_after,
        epoch_losses=epoch_losses, steps=steps, images=images, seconds=seconds,
    )
    info = {
        "name": f"smallfacenet-{dataset_name}-v{ds.info.version}-{sha[:8]}",
        "file": onnx_path.name, "sha256": sha, "role": "recognizer",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset, "embedding_dim": cfg.embedding_dim,
        "input": {"name": ONNX_INPUT, "shape": [None, 3, 112, 112], "colour": "RGB",
                  "mean": 127.5, "std": 127.5},
        "train": {"config": asdict(cfg), "loss_before": loss_before, "loss_after": loss_after,
                  "epoch_losses": epoch_losses, "images_per_s": result.images_per_s,
                  "device": str(device)},
    }
    Path(result.info_path).write_text(json.dumps(info, indent=2))
    return result


# ---------------------------------------------------------------------------------------------
# Export and use


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(model: nn.Module, path: str | Path, opset: int = 17) -> str:
    """Write ``model`` (eval mode, on CPU) as one self-contained ONNX file with a dynamic
    batch axis and return its sha256. The model is left on the CPU in eval mode."""
    model = model.cpu().eval()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # The TorchScript exporter (dynamo=False) needs no onnxscript and writes one file.
    torch.onnx.export(
        model, (torch.zeros(1, 3, 112, 112),), str(tmp), input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT], dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
        opset_version=opset, dynamo=False,
    )
    tmp.replace(path)
    return sha256_of(path)


def _onnx_session(onnx_path: str | Path, device: torch.device, threads: int = 0) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    sess = ort.InferenceSession(str(onnx_path), so, providers=providers)
    if device.type == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise ConfigError("asked for CUDA but onnxruntime has no CUDAExecutionProvider here")
    return sess


def onnx_embed_fn(onnx_path: str | Path, threads: int = 1) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """An ``embed_fn`` for :func:`reembed_faces` from an exported recognizer: a list of
    112x112 BGR uint8 crops -> ``(N, D)`` float32 L2-normalised, preprocessed as insightface's
    ``ArcFaceONNX`` does."""
    sess = _onnx_session(onnx_path, torch.device("cpu"), threads)
    name = sess.get_inputs()[0].name

    def embed(crops: Sequence[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, sess.get_outputs()[0].shape[1]), np.float32)
        blob = cv2.dnn.blobFromImages(list(crops), 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
        out = sess.run(None, {name: blob.astype(np.float32)})[0]
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    return embed


def reembed_faces(faces_table: pa.Table, embed_fn: Callable[[Sequence[np.ndarray]], np.ndarray],
                  batch_size: int = 256, model_tag: str | None = None) -> pa.Table:
    """The faces table with ``embedding`` recomputed from ``aligned_jpeg`` (decoded to BGR, in
    batches of ``batch_size``) by ``embed_fn`` (list of 112x112 BGR uint8 -> ``(N, D)``
    float32, like ``FaceBackend.embed``). Rows without a crop keep a null embedding. With
    ``model_tag`` the ``model`` column is set to it on re-embedded rows. No other column
    changes, row order included; identity ids are re-decided by the re-labelling that follows
    (see the module docstring). Raises :class:`BadInputError` for a crop that does not decode."""
    n = faces_table.num_rows
    crops = faces_table.column("aligned_jpeg").to_pylist()
    vectors: list[list[float] | None] = [None] * n
    todo = [i for i, c in enumerate(crops) if c]
    for lo in range(0, len(todo), batch_size):
        rows = todo[lo:lo + batch_size]
        images = []
        for i in rows:
            bgr = cv2.imdecode(np.frombuffer(crops[i], np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise BadInputError("bad_aligned_jpeg", f"row {i} does not decode")
            images.append(bgr)
        emb = np.asarray(embed_fn(images), np.float32)
        if emb.shape[0] != len(rows):
            raise ValueError(f"embed_fn returned {emb.shape[0]} vectors for {len(rows)} crops")
        for i, v in zip(rows, emb):
            vectors[i] = v.tolist()
    idx = faces_table.schema.get_field_index("embedding")
    out = faces_table.set_column(idx, faces_table.schema.field(idx), pa.array(vectors, faces_table.schema.field(idx).type))
    if model_tag is not None and "model" in out.column_names:
        m = out.schema.get_field_index("model")
        old = out.column("model").to_pylist()
        new = [model_tag if vectors[i] is not None else old[i] for i in range(n)]
        out = out.set_column(m, out.schema.field(m), pa.array(new, out.schema.field(m).type))
    return out


# ---------------------------------------------------------------------------------------------
# Model registry: <store>/models/registry.json

REGISTRY = "models/registry.json"


def load_registry(store_root: str) -> list[dict[str, Any]]:
    """The registered recognizers, oldest first (empty when nothing was registered)."""
    from storage.objectstore import open_store

    try:
        entries = json.loads(open_store(store_root).read_bytes(REGISTRY))
    except FileNotFoundError:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{REGISTRY} must hold a JSON list")
    return entries


def current_model(store_root: str) -> dict[str, Any] | None:
    """The most recently registered recognizer: the one the next refresh re-embeds with."""
    entries = load_registry(store_root)
    return entries[-1] if entries else None


def register_model(store_root: str, onnx_path: str | Path, *, name: str | None = None,
                   dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy an exported recognizer into ``<store>/models/files/<sha256>.onnx`` and append it to
    ``<store>/models/registry.json`` (name, sha256, file, created, parent dataset version,
    embedding size), making it the current model. Reads ``recognizer.json`` next to the file
    (written by :func:`train`) for what is not given. Registering a file whose sha256 is already
    registered makes it current again instead of adding a duplicate. Returns the entry.

    The registry is rewritten whole (read, append, write): run one registration at a time.
    """
    from storage.objectstore import open_store

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"model file not found: {onnx_path}")
    sidecar = onnx_path.with_suffix(".json")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    sha = sha256_of(onnx_path)
    if info.get("sha256") not in (None, sha):
        raise ConfigError(f"{sidecar} describes another file (sha256 {info['sha256'][:12]}...)")
    dim = _onnx_output_dim(onnx_path)
    store = open_store(store_root)
    rel = f"models/files/{sha}.onnx"
    if not store.exists(rel):
        store.put_file(rel, onnx_path)
    parent = dataset if dataset is not None else info.get("dataset")
    entry = {
        "name": name or info.get("name") or onnx_path.stem,
        "role": "recognizer",
        "sha256": sha,
        "file": rel,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {k: parent[k] for k in ("name", "version") if k in parent} if parent else None,
        "embedding_dim": dim,
    }
    entries = [e for e in load_registry(store_root) if e.get("sha256") != sha]
    entries.append(entry)
    store.write_bytes(REGISTRY, json.dumps(entries, indent=2).encode())
    log.info("registered recognizer %s (sha256 %s) in %s", entry["name"], sha[:12], store_root)
    return entry


def _onnx_output_dim(path: Path) -> int:
    """Embedding size of an ONNX recognizer; :class:`ConfigError` unless it takes
    ``(N, 3, 112, 112)`` and returns ``(N, D)``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = [[d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in (model.graph.input[0], model.graph.output[0])]
    if len(model.graph.output) != 1 or dims[0][1:] != [3, 112, 112] or len(dims[1]) != 2:
        raise ConfigError(f"{path} is not a 112x112 recognizer (input {dims[0]}, output {dims[1]})")
    return int(dims[1][1])


# ---------------------------------------------------------------------------------------------
# Training on top of the current embedder


class ResidualAdapter(nn.Module):
    """``y = x + W x + b`` on a recognizer's raw embedding, ``W`` and ``b`` zero at the start,
    so before any step the adapted model *is* the current embedder and training can only move
    away from it as far as the labels ask."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


@torch.no_grad()
def base_features(dataset: FaceShardDataset, base_onnx: str | Path, device: torch.device,
                  batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (not normalised) embeddings of every sample of this rank's part, from the frozen
    base recognizer, and their labels: ``(N, D)`` float32 and ``(N,)`` int64 on the CPU.

    Computed once, so the base network (the expensive part) runs one pass per training run,
    not one per epoch. Costs ``4 * D`` bytes per face held: 2 KB at 512-d, 2 GB per 10^6 faces.
    """
    sess = _onnx_session(base_onnx, device)
    name = sess.get_inputs()[0].name
    dataset.set_epoch(0)
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        feats.append(torch.from_numpy(sess.run(None, {name: x.numpy()})[0].astype(np.float32)))
        labels.append(y)
    if not feats:
        raise ConfigError("the dataset has no samples for this rank")
    return torch.cat(feats), torch.cat(labels).long()


def export_on_top(base_onnx: str | Path, adapter: ResidualAdapter, path: str | Path) -> str:
    """The base recognizer's graph with the adapter appended (MatMul, Add, residual Add) as one
    ONNX file; input and preprocessing unchanged, so insightface loads it like the base.
    Returns its sha256."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(base_onnx))
    graph = model.graph
    if len(graph.output) != 1:
        raise ConfigError(f"{base_onnx}: expected one output, found {len(graph.output)}")
    out = graph.output[0]
    # Names unused in the graph: a model trained on top of an adapted model gets a second adapter.
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    prefix = next(f"faceloop_adapter{k or ''}" for k in range(len(names) + 1)
                  if not any(n.startswith(f"faceloop_adapter{k or ''}.") for n in names))
    raw = out.name
    if raw == ONNX_OUTPUT:  # the base is one of ours: its output becomes an inner tensor
        raw = f"{prefix}.in"
        for node in graph.node:
            node.output[:] = [raw if o == ONNX_OUTPUT else o for o in node.output]
            node.input[:] = [raw if i == ONNX_OUTPUT else i for i in node.input]
    w = adapter.fc.weight.detach().cpu().numpy().T.astype(np.float32)  # x @ W^T
    b = adapter.fc.bias.detach().cpu().numpy().astype(np.float32)
    graph.initializer.extend([numpy_helper.from_array(w, f"{prefix}.weight"),
                              numpy_helper.from_array(b, f"{prefix}.bias")])
    graph.node.extend([
        helper.make_node("MatMul", [raw, f"{prefix}.weight"], [f"{prefix}.mm"], name=f"{prefix}/MatMul"),
        helper.make_node("Add", [f"{prefix}.mm", f"{prefix}.bias"], [f"{prefix}.delta"], name=f"{prefix}/Bias"),
        helper.make_node("Add", [raw, f"{prefix}.delta"], [ONNX_OUTPUT], name=f"{prefix}/Residual"),
    ])
    new_out = onnx.ValueInfoProto()
    new_out.CopyFrom(out)
    new_out.name = ONNX_OUTPUT
    graph.output.remove(out)
    graph.output.append(new_out)
    onnx.checker.check_model(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return sha256_of(path)


def _separation(feats: torch.Tensor, labels: torch.Tensor, max_n: int = 4096) -> float:
    """Mean same-identity cosine minus mean different-identity cosine over (up to ``max_n``)
    samples: a label-aware figure that, unlike the loss, compares the base and adapted models
    without a trained head."""
    f = F.normalize(feats[:max_n], dim=1)
    y = labels[:max_n]
    sim = f @ f.T
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool)
    pos, neg = sim[same & ~eye], sim[~same]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(pos.mean() - neg.mean())


def train_on_top(store_root: str, dataset_name: str, out_dir: str | Path, base_onnx: str | Path,
                 version: int | None = None, config: TrainConfig | None = None,
                 base_info: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune the current embedder to a dataset version: the base recognizer (an
    insightface-style ArcFace ONNX) stays frozen, a :class:`ResidualAdapter` on its embedding
    and a :class:`PartialFCArcFace` head are trained on the version's labels, and the export is
    the base graph with the adapter appended (``<out_dir>/recognizer.onnx`` + ``recognizer.json``
    naming the base model and its sha256). Much cheaper than training a backbone: the base runs
    once per sample, the epochs run on cached embeddings."""
    cfg = config or TrainConfig()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    base_onnx = Path(base_onnx)
    if not base_onnx.is_file():
        raise ConfigError(f"base recognizer not found: {base_onnx}")
    base_dim = _onnx_output_dim(base_onnx)
    ds = FaceShardDataset(store_root, dataset_name, version, seed=cfg.seed, batch_size=cfg.batch_size,
                          shuffle_window=cfg.shuffle_window)
    if ds.info.num_rows == 0:
        raise ConfigError(f"dataset {dataset_name!r} v{ds.info.version} is empty")
    t_feat = time.perf_counter()
    feats, labels = base_features(ds, base_onnx, device)
    feature_seconds = time.perf_counter() - t_feat
    adapter = ResidualAdapter(base_dim).to(device)
    head = PartialFCArcFace(ds.num_classes, base_dim, sample_rate=cfg.sample_rate,
                            scale=cfg.scale, margin=cfg.margin).to(device)
    adapter_opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head_opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    log.info("training an adapter on %s over %s: %d faces, %d classes, %d epochs",
             device, base_onnx.name, len(labels), ds.num_classes, cfg.epochs)

    def mean_loss() -> float:
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(1234)
            total = 0.0
            for i in range(0, len(labels), 1024):
                x, y = feats[i:i + 1024].to(device), labels[i:i + 1024].to(device)
                total += head(adapter(x), y, g).item() * len(y)
            return total / len(labels)

    sep_before = _separation(feats, labels)
    loss_before = mean_loss()
    epoch_losses: list[float] = []
    steps = images = 0
    seconds = 0.0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(labels), generator=order_gen)
        run, n = 0.0, 0
        t0 = time.perf_counter()
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, y = feats[idx].to(device), labels[idx].to(device)
            run += _step(head(adapter(x), y, gen), adapter_opt, head_opt) * len(y)
            n += len(y)
            steps += 1
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        seconds += time.perf_counter() - t0
        images += n
        epoch_losses.append(run / max(n, 1))
        log.info("epoch %d: loss %.4f", epoch, epoch_losses[-1])
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    loss_after = mean_loss()
    with torch.no_grad():
        sep_after = _separation(adapter(feats.to(device)).cpu(), labels)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "recognizer.onnx"
    sha = export_on_top(base_onnx, adapter.cpu(), onnx_path)
    base = dict(base_info or {})
    base.setdefault("file", base_onnx.name)
    base["sha256"] = sha256_of(base_onnx)
    dataset = _dataset_info(ds, dataset_name)
    result = TrainResult(
        onnx_path=str(onnx_path), sha256=sha, info_path=str(out / "recognizer.json"),
        device=str(device), dataset=dataset, loss_before=loss_before, loss_after=loss_after,
        epoch_losses=epoch_losses, steps=steps, images=images, seconds=seconds,
        separation_before=sep_before, separation_after=sep_after,
    )
    base_name = str(base.get("name") or base_onnx.stem)
    info = {
        "name": f"{base_name}+adapter-{dataset_name}-v{ds.info.version}-{sha[:8]}",
        "file": onnx_path.name, "sha256": sha, "role": "recognizer",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset, "embedding_dim": base_dim, "base": base,
        "input": {"name": "as the base model", "shape": [None, 3, 112, 112], "colour": "RGB",
                  "mean": 127.5, "std": 127.5},
        "train": {"mode": "on_top", "config": asdict(cfg), "loss_before": loss_before,
                  "loss_after": loss_after, "epoch_losses": epoch_losses,
                  "separation_before": sep_before, "separation_after": sep_after,
                  "base_feature_seconds": feature_seconds, "images_per_s": result.images_per_s,
                  "device": str(device)},
    }
    Path(result.info_path).write_text(json.dumps(info, indent=2))
    return result
