"""Turn a released MNIST model of Wong et al. 2020 into a Bulwark weights file.

locuslab/fast_adversarial ships two MNIST models trained by its MNIST/train_mnist.py:
``MNIST/models/fgsm.pth`` (FGSM-RS, the paper's fast recipe) and ``MNIST/models/pgd_madry.pth``
(PGD-40 with Madry et al.'s settings), both state dicts of ``mnist_net`` (an ``nn.Sequential``:
keys 0, 2, 5, 7). This reads one with ``torch.load(weights_only=True)`` (the restricted
unpickler: tensors and containers only, no code runs), renames the keys to Bulwark's
``mnist_net`` and writes a safetensors file whose metadata says ``normalization: none`` (their
network sees [0, 1] pixels). Evaluate it with ``bulwark run`` and a ``mode: evaluate`` spec
(``wong-fgsm.yaml``, ``wong-pgd.yaml`` here; README.md says how):

    python experiments/anchors/import_wong_mnist.py PATH/fgsm.pth wong-fgsm.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from bulwark.workers.engine.checkpoint import save_weights
from bulwark.workers.engine.models import build_model

# their nn.Sequential index -> Bulwark's mnist_net parameter prefix
KEYS = {"0": "net.features.0", "2": "net.features.2", "5": "net.classifier.1",
        "7": "net.classifier.3"}


def convert(src: Path, dst: Path) -> dict[str, str]:
    state = torch.load(src, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        index, _, leaf = key.partition(".")
        if index not in KEYS or leaf not in ("weight", "bias"):
            raise ValueError(f"{src}: unexpected key {key!r} (not a mnist_net state dict)")
        renamed[f"{KEYS[index]}.{leaf}"] = value
    model = build_model("mnist_net", num_classes=10, in_channels=1, image_size=28,
                        mean=(0.0,), std=(1.0,))
    model.load_state_dict(renamed, strict=True)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    meta = {"arch": "mnist_net", "num_classes": "10", "in_channels": "1", "image_size": "28",
            "mean": json.dumps([0.0]), "std": json.dumps([1.0]), "dataset": "mnist",
            "format": "bulwark-v1", "source": f"{src.name} sha256 {digest}"}
    save_weights(dst, model, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="fgsm.pth or pgd_madry.pth")
    ap.add_argument("dst", type=Path, help="the .safetensors file to write")
    args = ap.parse_args(argv)
    meta = convert(args.src, args.dst)
    print(f"{args.dst}: {meta['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
