"""Peak memory of tfds ingestion at two dataset sizes: streamed store cache vs a split read into RAM.

Each measurement is a fresh process (peak RSS is per process), reading a mocked
tfds dataset (`tfds.testing.mock_data`, no download) of 224x224x3 uint8 images:

  cnnpipe   `cnnpipe.datasets.tfds.tfds_dataset`: records streamed through the image path
            into a store cache (here at 224x224, no resize), then memory-mapped.
  in-RAM    the earlier approach: every record of each split copied into one array.

Both read the train and test splits (mock_data gives each `n` records); images/s
counts train images per second of the whole process, imports included.

Usage: .venv/bin/python benchmarks/bench_tfds_ingest.py [--sizes 1000 4000]
Prints peak RSS (MiB) and images/s per size, and the growth from the small to the large size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _builder():
    import tensorflow_datasets as tfds

    class Big224(tfds.core.GeneratorBasedBuilder):
        """Fixed 224x224 RGB images, 10 classes (records come from mock_data)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                         features=tfds.features.FeaturesDict({
                                             "image": tfds.features.Image(shape=(224, 224, 3)),
                                             "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "test": self._generate_examples()}

        def _generate_examples(self):
            yield from ()

    return tfds


def child(mode: str, n: int, cache: str) -> None:
    tfds = _builder()
    t0 = time.perf_counter()
    with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE):
        if mode == "cnnpipe":
            from cnnpipe.datasets.tfds import tfds_dataset

            ds = tfds_dataset("big224", split_train="train", split_val="test", cache_dir=cache)
            assert len(ds.train) == n
            total = float(np.asarray(ds.train.images[:: max(1, n // 100)], np.float64).mean())  # touch the store
        else:
            splits = []
            for split in ("train", "test"):  # both splits, as the store cache reads both
                src = tfds.data_source("big224", split=split)
                images = np.empty((len(src), 224, 224, 3), np.uint8)
                for i in range(len(src)):
                    images[i] = src[i]["image"]
                splits.append(images)
            total = float(splits[0].mean())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak, "seconds": seconds, "check": total}))


def measure(mode: str, n: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(n), cache], capture_output=True,
                             text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[1000, 4000])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    print(f"tfds ingestion, 224x224x3 uint8 records ({', '.join(map(str, args.sizes))} train images)")
    for mode in ("cnnpipe", "in-RAM"):
        rows = [measure(mode, n) for n in args.sizes]
        cells = ", ".join(f"{n}: peak RSS {r['peak_mib']:.0f} MiB, {n / r['seconds']:.0f} img/s"
                          for n, r in zip(args.sizes, rows))
        print(f"  {mode:8s} {cells}; growth {rows[1]['peak_mib'] - rows[0]['peak_mib']:+.0f} MiB "
              f"for {args.sizes[1] - args.sizes[0]} more images "
              f"({(args.sizes[1] - args.sizes[0]) * 224 * 224 * 3 / 2**20:.0f} MiB of pixels)")


if __name__ == "__main__":
    main()
