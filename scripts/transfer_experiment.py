"""Does starting from an earlier run on related data beat training from scratch at equal epochs?

Source: the built-in shapes, 8-bit RGB, seed 0, many images. Target: shapes drawn
afresh (seed 1) as 16-bit images, few of them (a few per class), the situation
`pretrained.weights: <run dir>` is for. The same target run is trained twice, from
scratch and from the source run (new head, same epochs, same seed), and both are
evaluated on the same held-out target images.

    python scripts/transfer_experiment.py [--model test_resnet] [--source-images 3000] [--target-images 60]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cnnpipe.config import config_from_dict
from cnnpipe.training.train import train_and_evaluate


def run(model: str, source_images: int, source_epochs: int, target_images: int, target_epochs: int,
        root: Path, log=lambda _line: None, size: int = 32) -> dict[str, float]:
    """{'scratch': val accuracy, 'transfer': val accuracy} of the target run (see the module docstring);
    images are `size` x `size` pixels."""
    common = {"model": model, "train": {"batch_size": 32, "eval_batch_size": 100, "num_devices": 1,
                                        "log_every_steps": 1000}}
    source = config_from_dict({**common, "data": {"source": "shapes", "num_train": source_images, "num_val": 100,
                                                  "size": [size, size]},
                               "train": {**common["train"], "epochs": source_epochs}})
    train_and_evaluate(source, root / "source", log=log)
    out = {}
    for label, weights in (("scratch", None), ("transfer", str(root / "source"))):
        cfg = config_from_dict({**common, "seed": 1, "pretrained": {"weights": weights},
                                "data": {"source": "shapes", "bit_depth": 16, "num_train": target_images,
                                         "num_val": 400, "size": [size, size]},
                                "train": {**common["train"], "epochs": target_epochs}})
        out[label] = train_and_evaluate(cfg, root / label, log=log)["final_val_accuracy"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--source-images", type=int, default=3000)
    ap.add_argument("--source-epochs", type=int, default=4)
    ap.add_argument("--target-images", type=int, default=60)
    ap.add_argument("--target-epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=32, help="image height and width")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        acc = run(args.model, args.source_images, args.source_epochs, args.target_images, args.target_epochs,
                  Path(tmp), log=print, size=args.size)
    print(f"target val accuracy ({args.target_images} 16-bit training images, {args.target_epochs} epochs, "
          f"{args.model}): from scratch {acc['scratch']:.3f}, from the source run {acc['transfer']:.3f}, "
          f"margin {acc['transfer'] - acc['scratch']:+.3f}")


if __name__ == "__main__":
    main()
