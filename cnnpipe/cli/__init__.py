"""Command-line entry point: argument parsing only; every command calls the library.

Each sub-command registers itself through one `_add_<name>` function listed in
`_COMMANDS`; its handler imports the library lazily so `cnnpipe --help` and
`cnnpipe decode` never pay for importing jax.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USAGE = 2  # bad input (a file, key or value): one line on stderr, no traceback


class CLIError(Exception):
    """An error to report as one line on stderr with exit status 2."""


from cnnpipe.cli.data import add_decode, add_preprocess  # noqa: E402  (after CLIError: none of it is needed there)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a CNN from a YAML config into a run directory",
                       description="Train from CONFIG (default: the packaged default config, a small CNN on the "
                                   "built-in shapes data) into a run directory: config.yaml, metrics.jsonl, "
                                   "checkpoints/, plots/, summary.json.")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config (default: the packaged default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable; value parsed as YAML)")
    p.add_argument("--workdir", metavar="DIR", help="run directory (default: runs/<config>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint, with its own config.yaml")
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="JAX's persistent compilation cache (default: $CNNPIPE_COMPILE_CACHE, else "
                        "$XDG_CACHE_HOME/cnnpipe/jax); 'off' disables it")
    g = p.add_argument_group("multi-process runs (jax.distributed; see README 'Scaling out')")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address, the same for every process (env CNNPIPE_COORDINATOR)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (env CNNPIPE_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1 (env CNNPIPE_PROCESS_ID)")
    g.add_argument("--distributed", choices=("auto", "off"),
                   help="auto: let jax detect the cluster (SLURM, TPU pod, Open MPI); off: ignore CNNPIPE_* variables")
    p.set_defaults(func=_run_train)


# Splitting a batch over CPU devices pays off from about 64 images per device: the reference CNN at batch
# 128 trains 1.35x faster on 2 devices than on 1 (bench_train.py), `simple_cnn` at batch 64 1.15-1.2x faster
# on one (6.5 vs 7.9 ms a step, bench_e2e.py's digits): below that, reduction and dispatch cost more.
MIN_IMAGES_PER_CPU_DEVICE = 64


def _cpu_device_count(cfg: object, multi_process: bool = False) -> int:
    """Devices to expose on a CPU host: up to one per core, each with at least 64 images of a
    train batch, and a count that divides both batch sizes; one per process in a multi-process run
    (processes on one host then share its cores)."""
    from cnnpipe.training.mesh import usable_cores

    tc = cfg.train  # type: ignore[attr-defined]
    if tc.num_devices:
        return int(tc.num_devices)
    if multi_process:
        return 1
    cores = usable_cores()
    return max(d for d in range(1, cores + 1) if tc.batch_size % d == 0 and tc.eval_batch_size % d == 0
               and (d == 1 or tc.batch_size // d >= MIN_IMAGES_PER_CPU_DEVICE))


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnpipe.config import load_config

    if args.resume:
        if args.config or args.overrides or args.workdir:
            raise CLIError("--resume continues RUN_DIR with its own config.yaml; "
                           "leave out CONFIG, --set and --workdir")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise CLIError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
        cfg, name = load_config(run_dir / "config.yaml"), run_dir.name
    else:
        cfg = load_config(args.config, args.overrides)
        name, run_dir = (Path(args.config).stem if args.config else "default"), args.workdir
    from cnnpipe.training import distributed

    cluster = distributed.cluster_from(args.coordinator, args.num_processes, args.process_id, args.distributed)
    # one XLA device per core (data parallel) must be chosen before jax starts its backend
    from cnnpipe.training.mesh import setup_cpu_devices

    setup_cpu_devices(_cpu_device_count(cfg, multi_process=cluster is not None))
    if cluster is None:
        return _train(cfg, run_dir, name, args)
    distributed.initialize(cluster)
    watch = distributed.PeerWatch(distributed.coordinator_host(cluster))  # a dead peer stops this process
    try:
        status = _train(cfg, run_dir, name, args)
    except BaseException as exc:  # noqa: BLE001 - every way out must skip jax's shutdown barrier
        status = _multi_process_exit(exc, args)
    watch.close()
    # jax's exit handler would wait at a shutdown barrier for processes that may be gone
    # (then abort with a trace); the run's files are complete, so leave now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _train(cfg: object, run_dir: object, name: str, args: argparse.Namespace) -> int:
    from cnnpipe.training.train import NonFiniteLossError, train_and_evaluate

    try:
        train_and_evaluate(cfg, run_dir, name=name, resume=bool(args.resume),  # type: ignore[arg-type]
                           compile_cache=args.compile_cache)
    except NonFiniteLossError as exc:
        print(f"cnnpipe train: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _multi_process_exit(exc: BaseException, args: argparse.Namespace) -> int:
    """One line for an error in a multi-process run, and its exit status (peer lost: 1)."""
    import jax

    from cnnpipe.training import distributed

    who = f"process {jax.process_index()} of {jax.process_count()}"
    if isinstance(exc, KeyboardInterrupt):
        print(f"cnnpipe train: {who}: interrupted", file=sys.stderr)
        return 130
    if distributed.is_peer_failure(exc):
        print(f"cnnpipe train: error: {who}: another process of this run stopped; stopping too "
              f"({_one_line(exc)[:300]})", file=sys.stderr)
        return 1
    if isinstance(exc, (CLIError, OSError, ValueError)) and not os.environ.get("CNNPIPE_DEBUG"):
        print(f"cnnpipe train: error: {who}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    import traceback

    traceback.print_exception(exc)
    return 1


_TTA_HELP = ("test-time augmentation: average the probabilities over the flips and rotations the run trained "
             "with (augment.flip, vflip, rot90)")


def _add_cv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv", help="k-fold cross-validation: one run per fold, then every metric's mean and std",
                       description="Train CONFIG once per fold (data.fold = 0..K-1) into WORKDIR/fold-<i> (each a "
                                   "normal run directory; rerun with the same --workdir to resume) and write "
                                   "WORKDIR/cv.json. "
                                   "The data: a store made with `preprocess --folds K`, or a folder (data.folds).")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config (default: the packaged default.yaml)")
    p.add_argument("--folds", type=int, metavar="K", help="folds (a store's own count by default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--workdir", metavar="DIR", help="folder of the fold runs (default: runs/<config>-cv-<time>)")
    p.add_argument("--compile-cache", metavar="DIR|off", help="as for cnnpipe train")
    p.set_defaults(func=_run_cv)


def _run_cv(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnpipe.config import load_config
    from cnnpipe.runs.cv import fold_count, format_cv, run_cv
    from cnnpipe.training.mesh import setup_cpu_devices
    from cnnpipe.training.train import NonFiniteLossError, default_run_dir

    cfg = load_config(args.config, args.overrides)
    fold_count(cfg, args.folds)  # a source without folds fails before jax starts
    name = Path(args.config).stem if args.config else "default"
    setup_cpu_devices(_cpu_device_count(cfg))
    workdir = Path(args.workdir) if args.workdir else default_run_dir(f"{name}-cv")
    try:
        result = run_cv(cfg, args.folds, workdir, name=name, compile_cache=args.compile_cache)
    except NonFiniteLossError as exc:
        print(f"cnnpipe cv: error: {exc}", file=sys.stderr)
        return 1
    print(format_cv(result))
    print(f"-> {workdir / 'cv.json'}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a trained run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `cnnpipe train` run directory")
    p.add_argument("--data", metavar="SPEC",
                   help="evaluate on other data: a store dir, an image folder, 'shapes' or 'tfds:NAME' "
                        "(default: the run's own validation data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                   help="override a data key of the run's config, e.g. --set data.split_val=train")
    p.add_argument("--checkpoint", default="best", metavar="WHICH",
                   help="best (default: by the run's early-stopping metric, else validation accuracy), latest, "
                        "or a step number")
    p.add_argument("--tta", action="store_true", help=_TTA_HELP)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from cnnpipe.runs.evaluate import data_overrides, describe_views, evaluate_run
    from cnnpipe.runs.load import load_run
    from cnnpipe.training.metrics import format_confusion

    bad = [o for o in args.overrides if not o.startswith("data.")]
    if bad:
        raise CLIError(f"--set {bad[0]!r}: evaluate only takes data.* keys")
    run = load_run(args.run_dir, args.checkpoint)
    overrides = (data_overrides(args.data, run.info) if args.data else []) + list(args.overrides)
    result, ds = evaluate_run(run, overrides, tta=args.tta)
    tta = f", {describe_views(result['views'])}" if args.tta else ""
    print(f"{run.run_dir} (checkpoint step {run.step}{tta}) on {ds.description}: {result['count']} validation images")
    if not run.task.is_classification:   # multi-label or regression: its metrics, per label or target
        from cnnpipe.runs.evaluate import format_task_result

        print(format_task_result(run, result))
        return 0
    print(f"accuracy: {result['accuracy']:.4f} ({result['confusion'].trace():.0f}/{result['count']})  balanced "
          f"accuracy: {result['balanced_accuracy']:.4f}  loss: {result['loss']:.4f}")
    print("per-class accuracy (recall):")
    for name, acc, total in zip(ds.classes, result["per_class_accuracy"], result["confusion"].sum(1)):
        print(f"  {name:<16} {'-' if acc is None else f'{acc:.4f}':>7}  ({int(total)} images)")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(format_confusion(result["confusion"], ds.classes))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes of image files, folders and @lists with a trained run",
                       description="Predict every file of SRC (image files, folders walked recursively, @LIST "
                                   "files with one path per line). A file that cannot be used gets its reason in "
                                   "the error column and the run goes on.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `cnnpipe train` run directory")
    p.add_argument("images", nargs="+", metavar="SRC", help="image files, folders or @LIST files")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to show per image (default: %(default)s)")
    p.add_argument("--out", metavar="PREDS.csv|.jsonl",
                   help="write path,rank,class,probability,error rows as CSV (JSON Lines if it ends in .jsonl); "
                        "a multi-label run: path,labels,<label>...,error; regression: path,<target>...,error")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="preparing processes (default: 0 = every core)")
    p.add_argument("--file-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="a file taking longer is stopped and gets a timeout error row (default: %(default)s; 0: none)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per device batch (default: 64)")
    p.add_argument("--checkpoint", default="best", metavar="WHICH",
                   help="best (default), latest, or a step number")
    p.add_argument("--tta", action="store_true", help=_TTA_HELP)
    p.set_defaults(func=_run_predict)


def _check_top_k_and_images(args: argparse.Namespace) -> None:
    """Fail before loading a model (inspect): --top-k must be >= 1 and every IMAGE must exist."""
    from pathlib import Path

    if args.top_k < 1:
        raise CLIError(f"--top-k: got {args.top_k}; expected an integer >= 1")
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: image file not found")


def _run_predict(args: argparse.Namespace) -> int:
    from cnnpipe.datasets.progress import log_lines_off_a_terminal
    from cnnpipe.runs.load import load_run
    from cnnpipe.runs.outputs import PredictionWriter
    from cnnpipe.runs.predict import expand_sources, predict_files, summary_line, timed

    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0 or not 0 <= args.file_timeout < 1e7:
        raise CLIError(f"--top-k and --batch-size must be >= 1, --workers and --file-timeout >= 0, got {args.top_k}, "
                       f"{args.batch_size}, {args.workers} and {args.file_timeout:g}")
    sources = expand_sources(args.images, nonempty=True)
    log_lines_off_a_terminal()
    run = load_run(args.run_dir, args.checkpoint)
    preds, stats = timed(predict_files(run, sources, top_k=args.top_k,
                                       batch_size=args.batch_size, workers=args.workers or None, tta=args.tta,
                                       file_timeout=args.file_timeout))
    if sys.stderr.isatty() and args.out:  # a progress bar on a terminal; the total is not known up front
        from tqdm import tqdm

        preds = tqdm(preds, unit="file", desc="predicting", file=sys.stderr, dynamic_ncols=True)
    if run.threshold_note:
        print(f"warning: {run.threshold_note}", file=sys.stderr)
    with PredictionWriter(args.out, run.task) as writer:
        for pred in preds:
            writer.write(pred)
    print(summary_line(int(stats["done"]), int(stats["failed"]), stats["seconds"]), file=sys.stderr)
    return 1 if stats["failed"] else 0  # every file has its row; 1 says some rows are errors


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a trained run as a StableHLO or ONNX model that runs without cnnpipe",
                       description="Export RUN_DIR's model: raw pixels (N, H, W, C) float32 -> class probabilities "
                                   "(N, K) (a multi-label run: each label's sigmoid probability; regression: values "
                                   "in the data's units), normalisation inside, N dynamic; PATH.json beside it says "
                                   "how to prepare pixels (classes, size, planes, bit depth, resize) and holds the "
                                   "thresholds or target statistics.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `cnnpipe train` run directory")
    p.add_argument("--format", choices=["onnx", "stablehlo"], required=True,
                   help="onnx (needs pip install 'cnnpipe[export]') or stablehlo (jax.export)")
    p.add_argument("--out", metavar="PATH", help="model file (default RUN_DIR/export/model.onnx|.stablehlo)")
    p.add_argument("--checkpoint", default="best", metavar="WHICH", help="best (default), latest, or a step number")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from cnnpipe.images.formats import display_path
    from cnnpipe.runs.export import export_run
    from cnnpipe.runs.load import load_run

    try:
        path = export_run(load_run(args.run_dir, args.checkpoint), args.format, args.out)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {display_path(path)} and {display_path(str(path) + '.json')}")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="feature maps, kernels, Grad-CAM and per-plane attribution as an HTML page",
                       description="Write DIR/index.html (default RUN_DIR/inspect/) with, per image: its channel "
                                   "planes, the feature maps of every conv and pool layer, the first layer's "
                                   "kernels per input plane, a Grad-CAM heat map, per-plane attribution and the "
                                   "top-k predictions; every picture is also a PNG and DIR/summary.json holds "
                                   "the numbers.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `cnnpipe train` run directory")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (decoded and resized like the training data)")
    p.add_argument("--worst", type=int, metavar="N",
                   help="instead of IMAGEs: the N validation images with the highest loss, with the most-confused "
                        "class pairs (default output RUN_DIR/worst)")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="layers to show (default: every conv and pool layer)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="explain this class with Grad-CAM and attribution (default: the predicted class)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/inspect)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="predictions to list per image (default: %(default)s)")
    p.add_argument("--checkpoint", default="best", metavar="WHICH", help="best (default), latest, or a step number")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    _check_top_k_and_images(args)
    if (args.worst is None) == (not args.images):
        raise CLIError("give IMAGE files or --worst N (not both)")
    if args.worst is not None:
        from cnnpipe.inspect.mistakes import inspect_worst

        if args.class_name:
            raise CLIError("--class explains a chosen class; --worst explains each image's predicted class")
        page = inspect_worst(args.run_dir, args.worst, out=args.out, layers=args.layers, top_k=args.top_k,
                             checkpoint=args.checkpoint)
        print(f"wrote {page} (the {args.worst} highest-loss validation images)")
        return 0
    from cnnpipe.inspect.report import inspect_run

    page = inspect_run(args.run_dir, args.images, layers=args.layers, class_name=args.class_name,
                       out=args.out, top_k=args.top_k, checkpoint=args.checkpoint)
    print(f"wrote {page} ({len(args.images)} image(s))")
    return 0


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_decode,
    add_preprocess,
    _add_train,
    _add_cv,
    _add_evaluate,
    _add_predict,
    _add_export,
    _add_inspect,
]


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other input error (`--help` keeps usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The `cnnpipe` argument parser with every sub-command registered."""
    parser = _Parser(prog="cnnpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    from cnnpipe.images.decode import DecodeError

    if args.command in ("preprocess", "predict"):   # a batch job's `kill` cleans up as Ctrl-C does
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(args.func(args) or 0)
    except (CLIError, DecodeError, OSError, ValueError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _quiet_broken_pipe()
        # ValueError covers the library's own input errors (config keys, store
        # contents); each message already names the file, key or value. OSError
        # (a read-only OUT, a file where a folder should be, a full disk) is
        # worded from its path and reason. CNNPIPE_DEBUG=1 shows the traceback
        # instead, for bug reports.
        if os.environ.get("CNNPIPE_DEBUG"):
            raise
        print(f"cnnpipe {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        print(f"cnnpipe {args.command}: {'terminated' if isinstance(exc, _Terminated) else 'interrupted'}",
              file=sys.stderr)
        if isinstance(exc, _Terminated):
            return 143
        if args.command in ("train", "cv"):
            # a checkpoint save cut short still has Orbax threads at work, which raise at interpreter
            # shutdown; leave now, as a kill would: resume ignores an unfinished checkpoint
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the job is, so its clean-up (temporary store, partial CSV, workers) runs."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _quiet_broken_pipe() -> int:
    """`cnnpipe evaluate RUN | head`: the reader left; stop quietly, and point stdout at
    /dev/null so the interpreter's final flush does not raise again (Python docs recipe)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def _one_line(exc: BaseException) -> str:
    """An error as one line that names the path: OSErrors from the system carry it in `filename`."""
    from cnnpipe.images.formats import display_path

    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{display_path(os.fsdecode(exc.filename))}: {exc.strerror or type(exc).__name__}"
        if exc.filename2 is not None:
            text += f" (-> {display_path(os.fsdecode(exc.filename2))})"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
