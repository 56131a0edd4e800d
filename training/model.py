"""The networks: a small backbone, the Partial-FC ArcFace head and the residual adapter that
training on top of an existing recognizer appends to it. See :mod:`training` for the whole story."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from faceloop.errors import ConfigError


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)
    )


class SmallFaceNet(nn.Module):
    """112x112 RGB (normalised) -> ``dim`` embedding. Four stride-2 conv blocks (56, 28, 14, 7)
    and a linear projection of the 7x7 map, as in ArcFace's "E" output layer (BN, dropout,
    FC, BN): the spatial layout of a face carries identity, so no global pooling."""

    def __init__(self, dim: int = 128, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w, 2),
            _conv_bn(w, 2 * w, 2),
            _conv_bn(2 * w, 2 * w, 1),
            _conv_bn(2 * w, 4 * w, 2),
            _conv_bn(4 * w, 4 * w, 1),
            _conv_bn(4 * w, 8 * w, 2),
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

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        sample_rate: float = 0.1,
        scale: float = 64.0,
        margin: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError("the dataset has no classes")
        if not 0 < sample_rate <= 1:
            raise ConfigError("sample_rate must be in (0, 1]")
        self.num_classes, self.dim = num_classes, dim
        self.sample_rate, self.scale, self.margin = sample_rate, scale, margin
        self.num_sample = min(num_classes, max(1, math.ceil(sample_rate * num_classes)))
        self.weight = nn.Parameter(torch.empty(num_classes, dim).normal_(0.0, 0.01))

    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
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

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        index, local = self.sample(labels, generator)
        w = F.embedding(index, self.weight, sparse=True)
        cos = F.linear(F.normalize(embeddings), F.normalize(w)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, local[:, None])
        theta = torch.acos(target)
        # Past pi - m, cos(theta + m) would rise again; use the usual linear fallback there.
        with_margin = torch.where(
            theta + self.margin < math.pi,
            torch.cos(theta + self.margin),
            target - self.margin * math.sin(self.margin),
        )
        logits = cos.scatter(1, local[:, None], with_margin) * self.scale
        return F.cross_entropy(logits, local)


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
