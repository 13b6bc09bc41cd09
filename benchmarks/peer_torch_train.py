"""The peer of bench_e2e: a plain PyTorch script training cnnpipe's default CNN on a store's arrays.

What a user would write by hand: load the arrays, normalise with the store's
per-channel mean/std, train `simple_cnn` (conv 3x3 16 SAME, ReLU, max pool 2, conv 3x3
32, ReLU, max pool 2, dense 64, ReLU, dense classes) with Adam 1e-3 on shuffled
batches, evaluate on the validation split after every epoch, save the weights at the
end. Prints one JSON line: accuracy and the seconds of each part.

    python benchmarks/peer_torch_train.py STORE --epochs 15 [--batch 64] [--out weights.pt]
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
    raise SystemExit("peer_torch_train.py needs PyTorch: .venv/bin/pip install torch==2.13.0") from None

T_IMPORT = time.perf_counter() - T0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t = time.perf_counter()
    meta = json.load(open(f"{args.store}/meta.json"))
    h, w = meta["size"]
    c, k = meta["channels"], len(meta["classes"])
    mean = torch.tensor(meta["mean"]).view(1, c, 1, 1)
    std = torch.tensor(meta["std"]).view(1, c, 1, 1)

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.load(f"{args.store}/{split}/images.npy").astype(np.float32).transpose(0, 3, 1, 2)
        y = np.load(f"{args.store}/{split}/labels.npy").astype(np.int64)
        return (torch.from_numpy(np.ascontiguousarray(x)) - mean) / std, torch.from_numpy(y)

    (xtr, ytr), (xva, yva) = load("train"), load("val")
    t_data = time.perf_counter() - t
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(c, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (h // 4) * (w // 4), 64), torch.nn.ReLU(),
        torch.nn.Linear(64, k))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    lossf = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    t_steps = t_eval = 0.0
    acc = 0.0
    for _ in range(args.epochs):
        t = time.perf_counter()
        net.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // args.batch):  # full batches, as cnnpipe
            idx = order[i * args.batch:(i + 1) * args.batch]
            opt.zero_grad()
            loss = lossf(net(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
        t_steps += time.perf_counter() - t
        t = time.perf_counter()
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(xva[i:i + args.eval_batch]).argmax(1) == yva[i:i + args.eval_batch]).sum())
                          for i in range(0, len(xva), args.eval_batch))
        acc = correct / len(xva)
        t_eval += time.perf_counter() - t
    t = time.perf_counter()
    if args.out:
        torch.save(net.state_dict(), args.out)
    t_save = time.perf_counter() - t
    print(json.dumps({"accuracy": acc, "seconds": {"imports": round(T_IMPORT, 3), "data": round(t_data, 3),
                                                   "steps": round(t_steps, 3), "eval": round(t_eval, 3),
                                                   "save": round(t_save, 3)}}))


if __name__ == "__main__":
    main()
