"""Write timm reference weights and logits for cnnpipe's backbone tests (needs torch and timm).

Run once, in a venv of its own (timm needs a torchvision that loads with its torch;
the CPU torch cnnpipe benchmarks against and PyPI's torchvision do not load together):

    python -m venv /tmp/timmvenv
    /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors
    /tmp/timmvenv/bin/python scripts/write_timm_fixtures.py --out tests/fixtures/timm test_resnet test_convnext

For each architecture it writes <arch>.safetensors (random weights, randomised batch-norm
statistics and layer scales, so no block is an identity) and <arch>.npz: fixed inputs
(NCHW) and timm's eval-mode logits for 3 planes, and for 1 and 5 planes through timm's
own `in_chans` adaptation of the same file. cnnpipe's tests then need neither torch nor timm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

NUM_CLASSES = 7
SIZE = (45, 37)   # odd sides: exercises PyTorch's padding and ceil-mode pooling


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Batch-norm statistics, norm affines and layer scales away from their identity inits."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2, generator=gen)
                mod.running_var.uniform_(0.5, 2.0, generator=gen)
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and mod.weight is not None:
                mod.weight.uniform_(0.5, 1.5, generator=gen)
                mod.bias.normal_(0, 0.1, generator=gen)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 0.6, generator=gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    ap.add_argument("--size", type=int, nargs=2, default=SIZE)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for arch in args.archs:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=args.num_classes).eval()
        randomise(model, gen)
        weights = out / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        rng = np.random.default_rng(0)
        ref = {"mean": np.asarray(model.pretrained_cfg["mean"]), "std": np.asarray(model.pretrained_cfg["std"])}
        for planes in (3, 1, 5):
            net = model if planes == 3 else timm.create_model(
                arch, pretrained=True, in_chans=planes, num_classes=args.num_classes,
                pretrained_cfg_overlay=dict(file=str(weights), num_classes=args.num_classes)).eval()
            x = rng.standard_normal((2, planes, *args.size)).astype(np.float32)
            with torch.no_grad():
                ref[f"x{planes}"], ref[f"logits{planes}"] = x, net(torch.from_numpy(x)).numpy()
        np.savez_compressed(out / f"{arch}.npz", **ref)
        print(f"{arch}: {weights} ({weights.stat().st_size / 1e6:.2f} MB), logits {ref['logits3'].shape}")


if __name__ == "__main__":
    main()
