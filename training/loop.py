"""Training loops: a backbone from scratch (:func:`train`) or an adapter on top of the current
embedder (:func:`train_on_top`), both on a published dataset version streamed by the reader."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from faceloop.errors import ConfigError
from faceloop.hashing import sha256_file
from storage.dataset import FaceShardDataset
from training.export import export_on_top, export_onnx
from training.infer import ONNX_INPUT, batch_runner, onnx_session
from training.model import PartialFCArcFace, ResidualAdapter, SmallFaceNet
from training.registry import onnx_output_dim, probe_recognizer

log = logging.getLogger(__name__)

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

    def __post_init__(self) -> None:
        # Refused before any work: `--epochs 0` used to export (and could register) a
        # recognizer that had never trained.
        bad = [
            f"{name} {value!r} (must be {rule})"
            for name, value, ok, rule in (
                ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
                ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
                ("lr", self.lr, self.lr > 0, "> 0"),
                ("head_lr", self.head_lr, self.head_lr > 0, "> 0"),
                ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                ("scale", self.scale, self.scale > 0, "> 0"),
                ("margin", self.margin, self.margin >= 0, ">= 0"),
                ("num_workers", self.num_workers, self.num_workers >= 0, ">= 0"),
                ("shuffle_window", self.shuffle_window, self.shuffle_window >= 1, ">= 1"),
                (
                    "max_steps",
                    self.max_steps,
                    self.max_steps is None or self.max_steps >= 1,
                    ">= 1",
                ),
            )
            if not ok
        ]
        if bad:
            raise ConfigError("training settings: " + "; ".join(bad))


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


def _owner_only(*files: Path) -> None:
    """A model trained on the store's faces is derived from biometric data (a recognizer can
    give away who was in its training set): its files are the owner's only, as the store's are
    (the folder is the caller's: it may be shared on purpose)."""
    for f in files:
        os.chmod(f, 0o600)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when torch sees one, else the CPU. ``cpu``, ``cuda`` or
    ``cuda:N`` asked for by name must exist: ConfigError (not a fall-back) when torch has no
    such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ConfigError(
                f"device {name!r}: torch {torch.__version__} sees "
                + (f"{count} CUDA device(s)" if count else "no CUDA device")
            )
    return dev


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    head: PartialFCArcFace,
    dataset: FaceShardDataset,
    device: torch.device,
    batch_size: int = 256,
    max_batches: int | None = None,
) -> float:
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
    return {
        "store": ds.info.store_root,
        "name": name,
        "version": ds.info.version,
        "num_rows": ds.info.num_rows,
        "num_classes": ds.num_classes,
    }


def _training_set(
    store_root: str, dataset_name: str, version: int | None, cfg: TrainConfig
) -> FaceShardDataset:
    """The version to train on; :class:`ConfigError` when it cannot teach a recognizer: no
    face, or one identity (a softmax over one class has nothing to learn: the loss is 0 from
    the first step, and a model registered from it would re-embed the whole store)."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        log.warning(
            "WORLD_SIZE=%s is set, but this training loop is one process with no gradient "
            "sync: it reads the whole dataset, not rank %s's part",
            os.environ.get("WORLD_SIZE"),
            os.environ.get("RANK", "?"),
        )
    ds = FaceShardDataset(
        store_root,
        dataset_name,
        version,
        # One process: the whole version (torchrun's RANK / WORLD_SIZE in the environment made
        # it train on a rank's part while its model card claimed the whole version).
        rank=0,
        world_size=1,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        shuffle_window=cfg.shuffle_window,
    )
    if ds.info.num_rows == 0:
        raise ConfigError(f"dataset {dataset_name!r} v{ds.info.version} is empty")
    if ds.num_classes < 2:
        raise ConfigError(
            f"dataset {dataset_name!r} v{ds.info.version} has {ds.num_classes} identity: "
            "a recognizer learns to tell people apart, train on at least 2"
        )
    return ds


def train(
    store_root: str,
    dataset_name: str,
    out_dir: str | Path,
    version: int | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train :class:`SmallFaceNet` + :class:`PartialFCArcFace` on a dataset version, export the
    backbone to ``<out_dir>/recognizer.onnx`` and describe it in ``recognizer.json`` (sha256,
    dataset name/version, embedding size, training numbers), which ``faceloop models
    register`` reads. Deterministic on CPU for a given seed."""
    cfg = config or TrainConfig()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ds = _training_set(store_root, dataset_name, version, cfg)
    model = SmallFaceNet(cfg.embedding_dim, cfg.width).to(device)
    head = PartialFCArcFace(
        ds.num_classes,
        cfg.embedding_dim,
        sample_rate=cfg.sample_rate,
        scale=cfg.scale,
        margin=cfg.margin,
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head_opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    log.info(
        "training on %s: %d rows, %d classes (%d sampled per step), %d epochs",
        device,
        ds.info.num_rows,
        ds.num_classes,
        head.num_sample,
        cfg.epochs,
    )

    loss_before = evaluate_loss(model, head, ds, device)
    epoch_losses: list[float] = []
    steps = images = 0
    seconds = 0.0
    for epoch in range(cfg.epochs):
        ds.set_epoch(epoch)
        loader = DataLoader(
            ds,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )
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
        onnx_path=str(onnx_path),
        sha256=sha,
        info_path=str(out / "recognizer.json"),
        device=str(device),
        dataset=dataset,
        loss_before=loss_before,
        loss_after=loss_after,
        epoch_losses=epoch_losses,
        steps=steps,
        images=images,
        seconds=seconds,
    )
    info = {
        "name": f"smallfacenet-{dataset_name}-v{ds.info.version}-{sha[:8]}",
        "file": onnx_path.name,
        "sha256": sha,
        "role": "recognizer",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": dataset,
        "embedding_dim": cfg.embedding_dim,
        "input": {
            "name": ONNX_INPUT,
            "shape": [None, 3, 112, 112],
            "colour": "RGB",
            "mean": 127.5,
            "std": 127.5,
        },
        "train": {
            "config": asdict(cfg),
            "loss_before": loss_before,
            "loss_after": loss_after,
            "epoch_losses": epoch_losses,
            "images_per_s": result.images_per_s,
            "device": str(device),
        },
    }
    Path(result.info_path).write_text(json.dumps(info, indent=2))
    _owner_only(onnx_path, Path(result.info_path))
    return result


@torch.no_grad()
def base_features(
    dataset: FaceShardDataset, base_onnx: str | Path, device: torch.device, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (not normalised) embeddings of every sample of this rank's part, from the frozen
    base recognizer, and their labels: ``(N, D)`` float32 and ``(N,)`` int64 on the CPU.

    Computed once, so the base network (the expensive part) runs one pass per training run,
    not one per epoch. Costs ``4 * D`` bytes per face held: 2 KB at 512-d, 2 GB per 10^6 faces.
    """
    run = batch_runner(onnx_session(base_onnx, str(device)))  # EdgeFace's: one crop per call
    dataset.set_epoch(0)
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        feats.append(torch.from_numpy(run(x.numpy()).astype(np.float32)))
        labels.append(y)
    if not feats:
        raise ConfigError("the dataset has no samples for this rank")
    return torch.cat(feats), torch.cat(labels).long()


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


def train_on_top(
    store_root: str,
    dataset_name: str,
    out_dir: str | Path,
    base_onnx: str | Path,
    version: int | None = None,
    config: TrainConfig | None = None,
    base_info: dict[str, Any] | None = None,
) -> TrainResult:
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
    base_dim = onnx_output_dim(base_onnx) or probe_recognizer(base_onnx)
    ds = _training_set(store_root, dataset_name, version, cfg)
    t_feat = time.perf_counter()
    feats, labels = base_features(ds, base_onnx, device)
    feature_seconds = time.perf_counter() - t_feat
    adapter = ResidualAdapter(base_dim).to(device)
    head = PartialFCArcFace(
        ds.num_classes, base_dim, sample_rate=cfg.sample_rate, scale=cfg.scale, margin=cfg.margin
    ).to(device)
    adapter_opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    head_opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    log.info(
        "training an adapter on %s over %s: %d faces, %d classes, %d epochs",
        device,
        base_onnx.name,
        len(labels),
        ds.num_classes,
        cfg.epochs,
    )

    def mean_loss() -> float:
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(1234)
            total = 0.0
            for i in range(0, len(labels), 1024):
                x, y = feats[i : i + 1024].to(device), labels[i : i + 1024].to(device)
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
            idx = perm[i : i + cfg.batch_size]
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
    base["sha256"] = sha256_file(base_onnx)
    dataset = _dataset_info(ds, dataset_name)
    result = TrainResult(
        onnx_path=str(onnx_path),
        sha256=sha,
        info_path=str(out / "recognizer.json"),
        device=str(device),
        dataset=dataset,
        loss_before=loss_before,
        loss_after=loss_after,
        epoch_losses=epoch_losses,
        steps=steps,
        images=images,
        seconds=seconds,
        separation_before=sep_before,
        separation_after=sep_after,
    )
    base_name = str(base.get("name") or base_onnx.stem)
    info = {
        "name": f"{base_name}+adapter-{dataset_name}-v{ds.info.version}-{sha[:8]}",
        "file": onnx_path.name,
        "sha256": sha,
        "role": "recognizer",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": dataset,
        "embedding_dim": base_dim,
        "base": base,
        "input": {
            "name": "as the base model",
            "shape": [None, 3, 112, 112],
            "colour": "RGB",
            "mean": 127.5,
            "std": 127.5,
        },
        "train": {
            "mode": "on_top",
            "config": asdict(cfg),
            "loss_before": loss_before,
            "loss_after": loss_after,
            "epoch_losses": epoch_losses,
            "separation_before": sep_before,
            "separation_after": sep_after,
            "base_feature_seconds": feature_seconds,
            "images_per_s": result.images_per_s,
            "device": str(device),
        },
    }
    Path(result.info_path).write_text(json.dumps(info, indent=2))
    _owner_only(onnx_path, Path(result.info_path))
    return result
