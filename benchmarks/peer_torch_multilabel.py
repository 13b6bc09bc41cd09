"""The multi-label peer: a plain PyTorch script training cnnpipe's default CNN on a multi-label store's arrays.

What a user would write by hand: load the arrays, normalise with the store's per-channel
mean/std, train `simple_cnn` (conv 3x3 16 SAME, ReLU, max pool 2, conv 3x3 32, ReLU, max
pool 2, dense 64, ReLU, dense labels) with Adam on shuffled full batches, with a sigmoid
binary cross-entropy per label masked to the known entries (labels.npy holds 1/0, NaN for
unknown; the loss is the mean over a batch's known entries), and evaluate on the
validation split after every epoch: macro mAP, the mean over the labels with at least one
known positive of scikit-learn's average precision on the rows where that label is known.
Prints one JSON line: the last epoch's mAP, the epochs and the seconds of each part.

    python benchmarks/peer_torch_multilabel.py STORE --epochs 10 [--batch 64] [--lr 1e-3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()

import numpy as np  # noqa: E402

try:
    import torch  # noqa: E402
except ImportError:
    raise SystemExit("peer_torch_multilabel.py needs PyTorch: .venv/bin/pip install torch==2.13.0") from None
from sklearn.metrics import average_precision_score  # noqa: E402

T_IMPORT = time.perf_counter() - T0


def macro_map(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean average precision over the labels with >= 1 known positive, each on its known rows (NaN = unknown)."""
    aps = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        if (y[known, j] == 1).any():
            aps.append(average_precision_score(y[known, j], scores[known, j]))
    return float(np.mean(aps)) if aps else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t = time.perf_counter()
    meta = json.load(open(f"{args.store}/meta.json"))
    h, w = meta["size"]
    c, k = meta["channels"], len(meta["classes"])
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, c, 1, 1)

    def load(split: str) -> tuple[torch.Tensor, np.ndarray]:
        x = np.load(f"{args.store}/{split}/images.npy").astype(np.float32).transpose(0, 3, 1, 2)
        y = np.load(f"{args.store}/{split}/labels.npy").astype(np.float32)
        return (torch.from_numpy(np.ascontiguousarray(x)) - mean) / std, y

    (xtr, ytr_np), (xva, yva) = load("train"), load("val")
    known_tr = torch.from_numpy(~np.isnan(ytr_np)).float()
    ytr = torch.from_numpy(np.nan_to_num(ytr_np, nan=0.0))
    t_data = time.perf_counter() - t
    torch.manual_seed(args.seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(c, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (h // 4) * (w // 4), 64), torch.nn.ReLU(),
        torch.nn.Linear(64, k))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    lossf = torch.nn.BCEWithLogitsLoss(reduction="none")
    g = torch.Generator().manual_seed(args.seed)
    t_steps = t_eval = 0.0
    mean_ap = float("nan")
    for _ in range(args.epochs):
        t = time.perf_counter()
        net.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // args.batch):  # full batches, as cnnpipe
            idx = order[i * args.batch:(i + 1) * args.batch]
            m = known_tr[idx]
            opt.zero_grad()
            loss = (lossf(net(xtr[idx]), ytr[idx]) * m).sum() / m.sum().clamp(min=1.0)
            loss.backward()
            opt.step()
        t_steps += time.perf_counter() - t
        t = time.perf_counter()
        net.eval()
        with torch.no_grad():
            scores = torch.cat([torch.sigmoid(net(xva[i:i + args.eval_batch]))
                                for i in range(0, len(xva), args.eval_batch)]).numpy()
        mean_ap = macro_map(yva, scores)
        t_eval += time.perf_counter() - t
    print(json.dumps({"map": mean_ap, "epochs": args.epochs,
                      "seconds": {"imports": round(T_IMPORT, 3), "data": round(t_data, 3),
                                  "steps": round(t_steps, 3), "eval": round(t_eval, 3)}}))


if __name__ == "__main__":
    main()
