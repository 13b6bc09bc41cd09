"""Preprocess throughput and memory: `cnnpipe preprocess` vs a single-process Pillow loop.

1. Throughput. Folders of 8-bit JPEGs, 16-bit RGB PNGs, and both mixed (a
   uint16 store), photo-like content at 256x256, resized to 64x64; and a
   "messy" folder shaped like users' data (tests/messy_folder.py): 16
   containers and bit depths at random sizes from 1x1 to 900x700 (none of
   them dividing evenly into the target), with broken files mixed in. For each
   folder the two contenders run in alternating timed blocks on the same files
   and the median images/s of each is printed with their ratio:
     pillow:  for each file, Image.open + .convert("RGB") + .resize((64, 64))
              + np.asarray, in one process, nothing written (Pillow also drops
              16-bit RGB to 8 bits on the way);
     cnnpipe: `preprocess(...)` on every core: scan, hash, decode exactly,
              resize, write the store (start-up of the worker pool included).
   Target: ratio >= 1.8 on a 2-core machine.
2. Labels from a table. The JPEG folder's files, flat in one folder (hard links)
   with a labels.csv of ids without extensions, against the class tree, in
   alternating timed blocks: the table path (read, match every row, report every
   file) costs nothing next to decoding. Target: table / tree >= 0.95.
4. Engines (--only dask). Whole `cnnpipe preprocess` processes, the dask engine on a local
   cluster vs the local engine, alternating, on 5,000 32x32 PNGs and 1,000 1024x768 JPEGs (the
   stores compared byte for byte); and the peak RSS of the process running preprocess on 5,000 vs
   50,000 tiny PNGs, for each engine (VmHWM). Targets: dask / local >= 0.8x; the dask client's memory
   grows with the file count only as the local engine's does (per-file names and report entries, no pixels).
3. Memory. Peak RSS of a fresh process running `preprocess` on folders of
   N and 10 N small JPEGs (N = 2,000), and the largest worker's peak. Target:
   the peak does not grow with the image count (the images stream to disk).

Run:  .venv/bin/python benchmarks/bench_preprocess.py [--quick] [--rounds R] [--workers N] [--only table]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from cnnpipe.datasets.preprocess import preprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from messy_folder import KINDS, make_messy_folder  # noqa: E402  (the tests' generator of users' data)

TARGET = (64, 64)


def _base(size: int, seed: int) -> np.ndarray:
    """A smooth photo-like float image in [0, 1], (size, size, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    fx, fy, fd = rng.uniform(15, 60, 3)
    base = (np.sin(x / fx) * np.cos(y / fy) + np.sin((x + y) / fd) + 2) / 4
    return np.stack([base, base ** 1.5, 1 - base], -1)


def make_folder(root: Path, n_jpeg: int, n_png16: int, size: int = 256, classes: int = 4) -> None:
    """Write photo-like JPEGs (quality 90) and 16-bit RGB PNGs into root/<class>/."""
    rng = np.random.default_rng(0)
    bases = [_base(2 * size, s) for s in range(8)]
    for i in range(n_jpeg + n_png16):
        b = bases[i % len(bases)]
        y0, x0 = rng.integers(0, size, 2)
        img = b[y0:y0 + size, x0:x0 + size] + rng.normal(0, 0.01, (size, size, 3)).astype(np.float32)
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        if i < n_jpeg:
            a = np.clip(img * 255, 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"img{i:06d}.jpg", quality=90)
        else:
            a = np.clip(img * 65535, 0, 65535).astype(np.uint16)
            (d / f"img{i:06d}.png").write_bytes(imagecodecs.png_encode(a, level=6))


def list_files(root: Path) -> list[Path]:
    return sorted(Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names)


def pillow_loop(files: list[Path]) -> int:
    """Images Pillow opened and resized; a file it cannot read is skipped, as cnnpipe skips it."""
    n = 0
    for p in files:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB").resize(TARGET[::-1], Image.Resampling.BICUBIC))
        except Exception:  # noqa: BLE001 - a broken file in the messy folder
            continue
        n += arr.shape[0] > 0
    return n


def cnnpipe_run(src: Path, out: Path, workers: int) -> int:
    store = preprocess(src, out, size=TARGET, resize="crop", val_fraction=0.1, workers=workers,
                       progress=False, overwrite=True)
    return len(store)


def throughput(name: str, src: Path, work: Path, rounds: int, workers: int, valid: int | None = None) -> dict:
    """Alternating timed blocks: Pillow loop, cnnpipe on one worker, cnnpipe on every core.

    Rates are valid images per second (`valid`: how many of the files are images; default all).
    """
    files = list_files(src)
    n_valid = len(files) if valid is None else valid
    pillow_loop(files[:50])  # warm the page cache and imports for both
    out = work / f"store-{name}"
    cnnpipe_run(src, out, workers)
    t_pil, t_one, t_all = [], [], []
    for _ in range(rounds):
        for times, fn, exact in ((t_pil, lambda: pillow_loop(files), False),
                                 (t_one, lambda: cnnpipe_run(src, out, 1), True),
                                 (t_all, lambda: cnnpipe_run(src, out, workers), True)):
            t0 = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t0)
            assert n == n_valid or not exact, (name, n, n_valid)  # cnnpipe stores every valid image
    dtype = json.loads((out / "meta.json").read_text())["dtype"]
    shutil.rmtree(out)
    pil, one, allc = (n_valid / statistics.median(t) for t in (t_pil, t_one, t_all))
    print(f"{name:<7} {len(files):>5} files -> {dtype:<6}  pillow loop {pil:7.1f} img/s | cnnpipe 1 worker "
          f"{one:7.1f} img/s ({one / pil:4.2f}x) | cnnpipe all cores {allc:7.1f} img/s  ratio {allc / pil:4.2f}x",
          flush=True)
    return {"case": name, "files": len(files), "pillow_img_s": pil, "cnnpipe_1_img_s": one,
            "cnnpipe_img_s": allc, "ratio": allc / pil}


def flat_with_table(tree: Path, out: Path) -> Path:
    """tree/<class>/<file> as out/<file> (hard links) and out.csv (id without extension, label), rows shuffled."""
    out.mkdir()
    rows = []
    for path in list_files(tree):
        os.link(path, out / path.name)
        rows.append(f"{path.stem},{path.parent.name}")
    np.random.default_rng(0).shuffle(rows)
    table = out.with_suffix(".csv")
    table.write_text("id,label\n" + "\n".join(rows) + "\n")
    return table


def table_vs_tree(tree: Path, work: Path, rounds: int, workers: int) -> dict:
    """Images/s of the class tree and of the same files labelled by a table, alternating; their ratio."""
    table = flat_with_table(tree, work / "flat")
    n = len(list_files(tree))
    runs = {"tree": lambda out: preprocess(tree, out, size=TARGET, workers=workers, progress=False, overwrite=True),
            "table": lambda out: preprocess(work / "flat", out, size=TARGET, workers=workers, progress=False,
                                            overwrite=True, labels=table)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, fn in runs.items():   # warm-up, and both stores hold every image
        assert len(fn(work / f"store-{name}")) == n
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(work / f"store-{name}")
            times[name].append(time.perf_counter() - t0)
    tree_s, table_s = (n / statistics.median(times[k]) for k in ("tree", "table"))
    print(f"table   {n:>5} files: class tree {tree_s:7.1f} img/s | labels.csv {table_s:7.1f} img/s  "
          f"ratio {table_s / tree_s:4.2f}x (target >= 0.95x; medians of {rounds})", flush=True)
    return {"case": "table", "tree_img_s": tree_s, "table_img_s": table_s, "ratio": table_s / tree_s}


_MEM_CHILD = """
import json, resource, sys, threading, time
import psutil
from cnnpipe.datasets.preprocess import preprocess
peak = {}
done = threading.Event()
def sample():  # worker processes descend from the fork server, so poll them by pid
    me = psutil.Process()
    while not done.is_set():
        for p in me.children(recursive=True):
            try:
                peak[p.pid] = max(peak.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.02)
t = threading.Thread(target=sample, daemon=True)
t.start()
store = preprocess(sys.argv[1], sys.argv[2], size=(48, 48), workers=int(sys.argv[3]), progress=False)
done.set()
t.join()
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child of a large parent reports the parent's
ru_self = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"stored": len(store), "parent_kib": ru_self, "worker_kib": max(peak.values(), default=0) // 1024}))
"""


def memory(n: int, work: Path, workers: int) -> dict:
    src = work / f"mem-{n}"
    rng = np.random.default_rng(1)
    base = (_base(256, 3) * 255).astype(np.uint8)
    for i in range(n):
        d = src / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        y0, x0 = rng.integers(0, 256 - 48, 2)
        Image.fromarray(base[y0:y0 + 48, x0:x0 + 48]).save(d / f"{i:06d}.jpg", quality=85)
    out = work / f"mem-store-{n}"
    res = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(src), str(out), str(workers)],
                         check=True, capture_output=True, text=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["n"] = n
    info["store_mib"] = sum(f.stat().st_size for f in out.rglob("*.npy")) / 2**20
    shutil.rmtree(src)
    shutil.rmtree(out)
    print(f"memory {n:>6} images: parent peak RSS {info['parent_kib'] / 1024:7.1f} MiB, largest worker "
          f"{info['worker_kib'] / 1024:7.1f} MiB (store on disk {info['store_mib']:.1f} MiB)", flush=True)
    return info


def _cli(src: Path, out: Path, workers: int, engine: str, size: str = "64") -> float:
    """Seconds of a whole `cnnpipe preprocess` process (imports, pool or cluster start-up, the store)."""
    cmd = [sys.executable, "-m", "cnnpipe.cli", "preprocess", str(src), str(out), "--size", size, "--overwrite",
           "--engine", engine, *(["--workers", str(workers)] if workers else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return took


def _files_of(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def engines(name: str, src: Path, work: Path, rounds: int, workers: int) -> dict:
    """Whole `cnnpipe preprocess` processes, local engine vs dask engine (a local cluster), alternating."""
    n = len(list_files(src))
    outs = {e: work / f"store-{name}-{e}" for e in ("local", "dask")}
    for e, out in outs.items():   # warm the page cache; the stores must be equal byte for byte
        _cli(src, out, workers, e)
    same = _files_of(outs["local"]) == _files_of(outs["dask"])
    times: dict[str, list[float]] = {"local": [], "dask": []}
    for _ in range(rounds):
        for e in ("local", "dask"):
            times[e].append(_cli(src, outs[e], workers, e))
    for out in outs.values():
        shutil.rmtree(out)
    local, dask = (n / statistics.median(times[e]) for e in ("local", "dask"))
    print(f"{name:<12} {n:>5} files: local engine {local:7.1f} img/s | dask engine {dask:7.1f} img/s  "
          f"ratio {dask / local:4.2f}x (target >= 0.8x); stores identical: {same}", flush=True)
    return {"case": name, "local_img_s": local, "dask_img_s": dask, "ratio": dask / local, "identical": same}


_ENGINE_MEM_CHILD = """
import json, sys
from cnnpipe.datasets.preprocess import preprocess
if __name__ == "__main__":
    store = preprocess(sys.argv[1], sys.argv[2], size=(8, 8), engine=sys.argv[3], progress=False)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec (this child would report the benchmark's peak)
    print(json.dumps({"stored": len(store), "kib": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])}))
"""


def engine_memory(ns: tuple[int, ...], work: Path) -> list[dict]:
    """Peak RSS of the process running `preprocess` (the client; with a local cluster its scheduler
    and worker threads too, the pool processes apart) on N tiny PNGs, for each engine."""
    rows = []
    rng = np.random.default_rng(2)
    for n in ns:
        src = work / f"dmem-{n}"
        for i in range(n):
            d = src / f"class{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:06d}.png")
        row = {"n": n}
        for engine in ("local", "dask"):
            out = work / f"dmem-store-{n}-{engine}"
            res = subprocess.run([sys.executable, "-c", _ENGINE_MEM_CHILD, str(src), str(out), engine],
                                 check=True, capture_output=True, text=True)
            row[engine] = json.loads(res.stdout.strip().splitlines()[-1])["kib"] / 1024
            shutil.rmtree(out)
        shutil.rmtree(src)
        print(f"peak RSS {n:>6} files: local engine {row['local']:6.1f} MiB, dask engine client {row['dask']:6.1f} "
              "MiB", flush=True)
        rows.append(row)
    return rows


def dask_part(work: Path, rounds: int, workers: int, quick: bool) -> None:
    """Issue 31's figures: the dask engine vs the local engine, and the client's memory."""
    rng = np.random.default_rng(5)
    small = work / "png-small"
    for i in range(500 if quick else 5000):
        d = small / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    photos = work / "jpeg-photo"
    for i in range(100 if quick else 1000):
        d = photos / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        if i < 8:   # 8 distinct photos, each saved under many names (a different last pixel: no duplicates)
            img = (_base(1024, i)[:768] * 255).astype(np.uint8)
        img[-1, -1] = i % 256, i // 256, 0
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
    rows = [engines("small-png", small, work, rounds, workers), engines("photo-jpeg", photos, work, rounds, workers)]
    mems = engine_memory((500, 5000) if quick else (5000, 50000), work)
    (a, b), per_file = mems, {}
    for e in ("local", "dask"):   # what each more file costs: its name, split, digest and report entry
        per_file[e] = (b[e] - a[e]) * 2**20 / (b["n"] - a["n"])
    print("dask / local: " + ", ".join(f"{r['case']} {r['ratio']:.2f}x" for r in rows) + " (target >= 0.8x); "
          f"peak RSS {b['n']} vs {a['n']} files: local x{b['local'] / a['local']:.2f} "
          f"({per_file['local']:.0f} B per file), dask client x{b['dask'] / a['dask']:.2f} "
          f"({per_file['dask']:.0f} B per file); no pixels are held")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller folders, one round (a smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating timed rounds (default 3, quick 1)")
    ap.add_argument("--workers", type=int, default=0, help="cnnpipe workers (default 0 = every core)")
    ap.add_argument("--n-jpeg", type=int, default=None, help="JPEG files (default 2000, quick 300)")
    ap.add_argument("--n-png16", type=int, default=None, help="16-bit PNG files (default 1000, quick 150)")
    ap.add_argument("--n-messy", type=int, default=None, help="messy-folder images (default 1000, quick 150)")
    ap.add_argument("--mem-n", type=int, default=None, help="memory test: N vs 10 N images (default 2000, quick 500)")
    ap.add_argument("--only", choices=["table", "messy", "dask"],
                    help="run one part: table = labels.csv vs the class tree; messy = the users' mixed folder; "
                         "dask = the dask engine vs the local engine, and the dask client's memory")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    n_jpeg = args.n_jpeg if args.n_jpeg is not None else (300 if args.quick else 2000)
    n_png = args.n_png16 if args.n_png16 is not None else (150 if args.quick else 1000)
    mem_n = args.mem_n or (500 if args.quick else 2000)
    n_messy = args.n_messy or (150 if args.quick else 1000)
    print(f"cpu cores: {os.cpu_count()}, workers: {args.workers or os.cpu_count()}, rounds: {rounds}, "
          f"256x256 -> {TARGET[0]}x{TARGET[1]}, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if args.only == "dask":
            dask_part(work, max(rounds, 3), args.workers, args.quick)
            return
        if args.only == "messy":
            messy = make_messy_folder(work / "messy", per_class=n_messy // 3, classes=3, big_every=12)
            row = throughput("messy", work / "messy", work, max(rounds, 3), args.workers, valid=len(messy.valid))
            print(f"messy folder ({len(messy.valid)} images of {len(KINDS)} kinds, {len(messy.bad)} broken): "
                  f"{row['ratio']:.2f}x the one-process Pillow loop")
            return
        make_folder(work / "jpeg8", n_jpeg, 0)
        if args.only == "table":
            table_vs_tree(work / "jpeg8", work, max(rounds, 5), args.workers)
            return
        make_folder(work / "png16", 0, n_png)
        mixed = work / "mixed"
        for folder in ("jpeg8", "png16"):
            for cls in sorted((work / folder).iterdir()):
                (mixed / cls.name).mkdir(parents=True, exist_ok=True)
                (mixed / cls.name / folder).symlink_to(cls)
        print(f"generated {n_jpeg} JPEGs and {n_png} 16-bit PNGs in {time.perf_counter() - t0:.1f} s", flush=True)
        messy = make_messy_folder(work / "messy", per_class=n_messy // 3, classes=3, big_every=12)
        print(f"messy folder: {len(messy.valid)} images of {len(KINDS)} kinds, 1x1 to 900x700, plus "
              f"{len(messy.bad)} broken files", flush=True)
        rows = [throughput(name, work / name, work, rounds, args.workers) for name in ("jpeg8", "png16", "mixed")]
        rows.append(throughput("messy", work / "messy", work, rounds, args.workers, valid=len(messy.valid)))
        rows.append(table_vs_tree(work / "jpeg8", work, max(rounds, 5), args.workers))
        mems = [memory(n, work, args.workers) for n in (mem_n, 10 * mem_n)]
    growth = mems[1]["parent_kib"] / mems[0]["parent_kib"]
    wgrowth = mems[1]["worker_kib"] / mems[0]["worker_kib"]
    print("all-core ratios: " + ", ".join(f"{r['case']} {r['ratio']:.2f}x" for r in rows) + " (target >= 1.8x); "
          f"peak RSS {10 * mem_n} vs {mem_n} images: parent x{growth:.2f}, largest worker x{wgrowth:.2f} "
          f"(store on disk x{mems[1]['store_mib'] / mems[0]['store_mib']:.1f}); load average now "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
