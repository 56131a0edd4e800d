"""Train an ArcFace recognizer on a published dataset version and (optionally) register it.

    python examples/train_arcface.py --store ./var/store --dataset faces --epochs 10 \
        --out ./var/train

Same as ``faceloop train``; this file only shows the library calls a training job makes.
"""

from __future__ import annotations

import argparse
import logging

from training.loop import TrainConfig, train
from training.registry import register_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--dataset", default="faces")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--register", action="store_true")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    res = train(
        args.store,
        args.dataset,
        args.out,
        version=args.version,
        config=TrainConfig(epochs=args.epochs),
    )
    print(
        f"loss {res.loss_before:.4f} -> {res.loss_after:.4f} on {res.device}, "
        f"{res.images_per_s:.0f} images/s; {res.onnx_path} sha256:{res.sha256}"
    )
    if args.register:
        print("registered:", register_model(args.store, res.onnx_path)["name"])


if __name__ == "__main__":
    main()
