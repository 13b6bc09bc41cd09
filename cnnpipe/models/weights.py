"""Pretrained weights: read timm/torchvision state dicts and copy them into cnnpipe's backbones.

Sources (`read_state_dict`):
- ``.safetensors``: read with `safetensors.numpy`, no torch needed;
- ``.pth`` / ``.pt`` / ``.bin``: through ``torch.load(weights_only=True)``, only when torch
  is installed (a one-line error says how to convert otherwise);
- ``hf-hub:timm/<name>.<tag>``: `model.safetensors` (and `config.json` for the mean/std)
  from the Hugging Face hub through `huggingface_hub` (the optional `hub` extra), cached
  in its own cache; offline, a one-line error says where to put the file.

`copy_weights` checks every key and shape before it changes anything and names what
does not fit. `adapt_input_conv` is timm's `in_chans` adaptation
(timm `models/_manipulate.py: adapt_input_conv`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_state_dict", "adapt_input_conv", "copy_weights", "WeightsError", "IMAGENET_MEAN",
           "IMAGENET_STD", "weights_config", "is_hub"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # timm's IMAGENET_DEFAULT_MEAN, over [0, 1] values
IMAGENET_STD = (0.229, 0.224, 0.225)
# architectures whose timm weights use other statistics (timm's default pretrained_cfg)
_ARCH_STATS = {"test_resnet": ((0.5,) * 3, (0.5,) * 3), "test_convnext": ((0.5,) * 3, (0.5,) * 3)}
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the architecture (one line, names the file)."""


def is_hub(source: str) -> bool:
    return str(source).startswith("hf-hub:")


def read_state_dict(source: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: float32 array} of a timm/torchvision state dict (PyTorch layouts: OIHW convs, (out, in) linears).

    Raises:
      WeightsError: a missing or unreadable file, an unknown suffix, a .pth without torch,
        or an hf-hub name that cannot be downloaded.
    """
    path = _hub_file(str(source), "model.safetensors") if is_hub(str(source)) else Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            raw = load_file(str(path))
        elif suffix in _TORCH_SUFFIXES:
            raw = _torch_load(path)
        else:
            raise WeightsError(f"{path}: unknown weights format {suffix or '(no suffix)'!r}; "
                               "expected .safetensors, or .pth/.pt/.bin with torch installed")
    except WeightsError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:   # safetensors raises SafetensorError too
        raise WeightsError(f"{path}: cannot read weights ({_one_line(exc)})") from None
    except Exception as exc:   # safetensors_rust.SafetensorError and torch's unpickling errors
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {_one_line(exc)})") from None
    return _clean(raw, path)


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: reading {path.suffix} weights needs torch (pip install torch); "
                           "or save them as .safetensors (safetensors.torch.save_file) and use that") from None
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if hasattr(v, "float") else v for k, v in _unwrap(obj).items()}


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """A training checkpoint's state dict: timm's and torchvision's wrappers ('state_dict', 'model', ...)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def _clean(raw: Mapping[str, Any], path: Path) -> dict[str, np.ndarray]:
    out = {}
    for key, value in _unwrap(raw).items():
        if not hasattr(value, "shape"):
            continue
        key = key[7:] if key.startswith("module.") else key   # DataParallel / DDP prefix
        out[key] = np.asarray(value, np.float32)
    if not out:
        raise WeightsError(f"{path}: no tensors found (not a state dict?)")
    return out


def _hub_file(source: str, filename: str) -> Path:
    repo = source[len("hf-hub:"):].strip()
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise WeightsError(f"{source}: expected hf-hub:<owner>/<name>, e.g. hf-hub:timm/resnet18.a1_in1k")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError(f"{source}: hf-hub weights need huggingface_hub (pip install 'cnnpipe[hub]'), or "
                           f"download {filename} from https://huggingface.co/{repo} and give its path") from None
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))   # cached: no network at all
    except Exception:   # not cached yet: download below
        pass
    try:
        with _quiet_hub():   # its retry warnings would bury the one line below
            return Path(hf_hub_download(repo, filename))
    except Exception:   # offline, unknown repo, no such file: all one message
        raise WeightsError(f"{source}: cannot download {filename} (offline?); download it from "
                           f"https://huggingface.co/{repo} and set pretrained.weights to its path") from None


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's logger at error level (and Python warnings off) for one download."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def weights_config(source: str | os.PathLike, arch: str | None = None) -> dict[str, Any]:
    """The weights' preprocessing: {'mean', 'std'} over [0, 1] values and where they came from.

    From the hub's `config.json` (or one beside a local file: timm's `pretrained_cfg`),
    else timm's default for `arch`: ImageNet's statistics, (0.5, 0.5, 0.5) for the test
    models. Raises WeightsError naming a config.json whose mean/std are not 3 finite
    numbers (std > 0).
    """
    if is_hub(str(source)):
        try:
            cfg_path = _hub_file(str(source), "config.json")
        except WeightsError:
            cfg_path = None
    else:
        cfg_path = Path(source).expanduser().with_name("config.json")
    if cfg_path is not None and cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cfg = None   # not a timm config: another tool's file of that name
        pre = cfg.get("pretrained_cfg") if isinstance(cfg, dict) else None
        if isinstance(pre, dict) and ("mean" in pre or "std" in pre):
            mean, std = _three(pre.get("mean")), _three(pre.get("std"))
            if mean is None or std is None or min(std) <= 0:
                raise WeightsError(f"{cfg_path}: pretrained_cfg mean/std must be 3 finite numbers each (std > 0); "
                                   f"got mean {pre.get('mean')!r}, std {pre.get('std')!r}")
            return {"mean": mean, "std": std, "from": "config.json"}
    mean, std = _ARCH_STATS.get(arch or "", (IMAGENET_MEAN, IMAGENET_STD))
    return {"mean": mean, "std": std, "from": "ImageNet defaults" if mean == IMAGENET_MEAN else f"timm's {arch} default"}


def _three(value: Any) -> tuple[float, ...] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def adapt_input_conv(in_channels: int, weight: np.ndarray) -> np.ndarray:
    """timm's `adapt_input_conv`: an RGB first-conv kernel (O, 3, kh, kw) for `in_channels` planes.

    1 plane: the RGB kernels summed. N planes: the RGB kernels repeated to N and scaled
    by 3 / N, so a plane-constant input gives the same activation as before.
    """
    o, i, kh, kw = weight.shape
    if in_channels == i:
        return weight
    if in_channels == 1:
        if i > 3:
            if i % 3:
                raise WeightsError(f"cannot adapt a {i}-plane first convolution to 1 plane "
                                   "(timm adapts 3-plane weights, or multiples of 3 to 1)")
            return weight.reshape(o, i // 3, 3, kh, kw).sum(axis=2)
        return weight.sum(axis=1, keepdims=True)
    if i != 3:
        raise WeightsError(f"cannot adapt a {i}-plane first convolution to {in_channels} planes "
                           "(timm adapts 3-plane weights only)")
    repeat = int(math.ceil(in_channels / 3))
    return (np.tile(weight, (1, repeat, 1, 1))[:, :in_channels] * (3 / float(in_channels))).astype(weight.dtype)


# ---------------------------------------------------------------- copying into a model

def _targets(module: Any) -> dict[str, tuple[Any, Callable[[np.ndarray], np.ndarray]]]:
    """{torch suffix: (variable, torch array -> flax array)} for one module."""
    from flax import nnx

    from cnnpipe.models.layers import Conv, LayerNorm

    if isinstance(module, nnx.Variable):   # a bare parameter (layer scale): (C,), (C, 1, 1) in torchvision
        return {"": (module, lambda a: a.reshape(module.shape))}
    if isinstance(module, Conv):
        out = {"weight": (module.kernel, lambda a: a.transpose(2, 3, 1, 0))}   # OIHW -> HWIO
    elif isinstance(module, nnx.Linear):   # (out, in) or a 1x1 conv's (out, in, 1, 1) -> (in, out)
        out = {"weight": (module.kernel, lambda a: a.reshape(a.shape[0], -1).T)}
    elif isinstance(module, nnx.BatchNorm):
        return {"weight": (module.scale, _same), "bias": (module.bias, _same),
                "running_mean": (module.mean, _same), "running_var": (module.var, _same)}
    elif isinstance(module, LayerNorm):
        return {"weight": (module.scale, _same), "bias": (module.bias, _same)}
    else:
        raise TypeError(f"no weight mapping for {type(module).__name__}")
    if getattr(module, "bias", None) is not None:
        out["bias"] = (module.bias, _same)
    return out


def _same(a: np.ndarray) -> np.ndarray:
    return a


def copy_weights(pairs: Sequence[tuple[str, Any]], sd: Mapping[str, np.ndarray], *, source: str,
                 skip: Sequence[str] = (), check_only: bool = False) -> list[str]:
    """Copy `sd` into the modules of `pairs` ((torch prefix, module)); every key checked first.

    `skip`: prefixes left as initialised (a new classifier head); `check_only`: check
    without copying (the modules may be abstract, from `nnx.eval_shape`). Returns the keys of
    `sd` that were not used besides batch-norm counters (for the caller to judge).
    Raises WeightsError naming the first missing key or shape mismatch, and the
    architecture the file probably holds.
    """
    plan, used = [], set()
    for prefix, module in pairs:
        if any(prefix == s or prefix.startswith(s + ".") for s in skip):
            used.update(k for k in sd if k == prefix or k.startswith(prefix + "."))
            continue
        for suffix, (var, convert) in _targets(module).items():
            key = f"{prefix}.{suffix}" if suffix else prefix
            if key not in sd:
                raise WeightsError(f"{source}: key {key!r} is missing; the file does not hold this architecture's "
                                   f"weights ({len(sd)} tensors, first {next(iter(sd))!r})")
            value = convert(sd[key])
            if not np.isfinite(value).all():
                raise WeightsError(f"{source}: {key} holds non-finite values (NaN or inf); damaged weights?")
            if tuple(value.shape) != tuple(var.shape):
                raise WeightsError(f"{source}: {key} has shape {list(sd[key].shape)}, which does not fit "
                                   f"(expected {list(var.shape)} after conversion); a different architecture?")
            plan.append((var, value))
            used.add(key)
    import jax.numpy as jnp

    for var, value in [] if check_only else plan:
        var.set_value(jnp.asarray(value, var.dtype))   # also fills an abstract (eval_shape) model
    return sorted(k for k in sd if k not in used and not k.endswith("num_batches_tracked"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
