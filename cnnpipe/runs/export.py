"""`cnnpipe export`: a trained run as a model that runs without cnnpipe (StableHLO or ONNX).

The exported function maps raw pixels (N, H, W, C) float32, holding the store's
integer values, with N dynamic, to class probabilities (N, K); normalisation is
inside. Beside it, ``PATH.json`` says what a caller needs to prepare pixels the way
training did: classes, size, planes and their names, bit depth, resize mode, page
mode, image-path version and cnnpipe version.

- StableHLO: `jax.export`, serialised; reload with ``jax.export.deserialize(blob).call(x)``.
- ONNX: jax2onnx (what Keras 3 uses), an optional extra: ``pip install 'cnnpipe[export]'``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cnnpipe.files import atomic_path, write_atomic
from cnnpipe.runs.load import Run, spec_for_run
from cnnpipe.tasks import Task

__all__ = ["FORMATS", "export_model", "export_run", "preparation_info"]

FORMATS = ("stablehlo", "onnx")
_SUFFIX = {"stablehlo": ".stablehlo", "onnx": ".onnx"}


_COMMON = ("decode every value exactly (no colour profile or gamma applied); apply the EXIF/TIFF orientation; "
           "{planes}; an 8-bit file for a 16-bit model is promoted x257; resize (H, W) by `resize`: crop = "
           "scale to cover then centre-crop, pad = scale to fit then centre on zeros, stretch = scale each side; "
           "antialiased bicubic (Pillow's, with reducing_gap 2; 16-bit planes in float32, rounded); "
           "cnnpipe's Run.prepare(path) does all of this")
# what differs for float and signed stores (`cnnpipe.images.pixel_types`)
_SCIENTIFIC = dict.fromkeys(("int16", "float32"), (
    "; for this model's signed or float data: values as they are (no x257), NaN, +-Inf and the file's GDAL_NODATA "
    "value (and float64 beyond float32's range) as NaN, resampled in float32 without rounding or clipping by "
    "normalised convolution (NaN where under half of an output's weight is valid), padding NaN; the model fills NaN"))
_PREPARATION = {"rgb": _COMMON.format(planes="drop alpha; a gray image gives R = G = B"),
                "gray": _COMMON.format(planes="drop alpha; a colour image gives one luma plane (ITU-R 601, Pillow's "
                                              "weights)"),
                "native": _COMMON.format(planes="keep the file's own planes (alpha too), which must number "
                                                "`channels`")}


def preparation_info(run: Run, fmt: str) -> dict[str, Any]:
    """What a caller needs to prepare pixels for the exported model (written as ``PATH.json``)."""
    import cnnpipe
    from cnnpipe.images.transform import IMAGE_PATH_VERSION

    info, task = run.info, run.task
    output = {"classification": "class probabilities (N, K) float32",
              "multilabel": "sigmoid probabilities (N, L) float32, one per label; a label is predicted where its "
                            "probability >= its threshold",
              "regression": "predicted values (N, T) float32 in the data's units"}[task.kind]
    extra: dict[str, Any] = {} if task.is_classification else {"task": task.kind}
    if task.kind == "multilabel":
        extra["thresholds"] = dict(zip(task.names, map(float, run.thresholds)))
    elif task.kind == "regression":
        extra.update(targets=list(task.names), target_mean=list(task.target_mean or ()),
                     target_std=list(task.target_std or ()))
    return {"format": fmt, "input": "raw pixels (N, H, W, C) float32 holding the store's values (its integers, or "
                                    "float32 values with NaN for no data, which the model fills)",
            "dtype": str(info.get("dtype") or ("uint16" if int(info["bit_depth"]) == 16 else "uint8")),
            "output": output, **extra, "classes": list(info["classes"]),
            "size": list(info["size"]), "channels": int(info["channels"]), "planes": info.get("planes"),
            "bit_depth": int(info["bit_depth"]), "resize": info.get("resize") or "crop",
            "pages": info.get("pages") or "first", "image_path_version": IMAGE_PATH_VERSION,
            "preparation": _PREPARATION[spec_for_run(info).channels] + _SCIENTIFIC.get(str(info.get("dtype")), ""),
            "onnx_input": "in_0 (N, H, W, C) float32" if fmt == "onnx" else None,
            "cnnpipe_version": cnnpipe.__version__, "checkpoint_step": run.step}


def _probabilities(model: Any, task: Any = None) -> Any:
    """A pure function raw pixels -> probabilities (softmax; a multi-label or regression `task`: its outputs,
    sigmoid probabilities or de-standardised values), with the model's parameters as constants (eval mode)."""
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    def fn(x: Any) -> Any:
        return (task or Task()).outputs(nnx.merge(graphdef, state)(x))

    return fn


def export_run(run: Run, fmt: str, out: str | os.PathLike | None = None) -> Path:
    """Export `run` as `fmt` to `out` (default ``RUN/export/model.<fmt>``) with ``PATH.json`` beside it.

    Returns the model's path. Raises ValueError (an unknown format) or ImportError (ONNX
    without the ``export`` extra; the message names it).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: got {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(out) if out else run.run_dir / "export" / f"model{_SUFFIX[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model(run.model(), fmt, path, run.task)
    write_atomic(path.with_name(path.name + ".json"), json.dumps(preparation_info(run, fmt), indent=2) + "\n")
    return path


def export_model(model: Any, fmt: str, path: str | os.PathLike, task: Any = None) -> None:
    """Write `model` (a `cnnpipe.models.cnn.CNN`) as StableHLO or ONNX: raw pixels (N, H, W, C) float32 with
    N dynamic -> probabilities (N, K), or a multi-label or regression `task`'s outputs. Never half-written
    (a temporary sibling, then a rename)."""
    shape = (*model.input_size, model.in_channels)
    blob = _stablehlo(model, shape, task) if fmt == "stablehlo" else _onnx(model, shape, task)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)


def _stablehlo(model: Any, shape: tuple[int, int, int], task: Any = None) -> bytes:
    import jax
    import jax.numpy as jnp
    from jax import export

    (batch,) = export.symbolic_shape("n")
    spec = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    return bytes(export.export(jax.jit(_probabilities(model, task)))(spec).serialize())


def _onnx(model: Any, shape: tuple[int, int, int], task: Any = None) -> bytes:
    import contextlib
    import io
    import logging

    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ImportError("--format onnx needs the export extra: pip install 'cnnpipe[export]'") from None
    serde = logging.getLogger("onnx_ir.serde")
    level = serde.level
    serde.setLevel(logging.ERROR)  # notes about constant shapes, not problems
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints debug lines
            proto = to_onnx(_probabilities(model, task), inputs=[("N", *shape)], model_name="cnnpipe")
    finally:
        serde.setLevel(level)
    return proto.SerializeToString()
