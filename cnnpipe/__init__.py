"""cnnpipe: folders of 8- and 16-bit images -> exact channel planes -> trained JAX CNNs.

The decode stage is imported eagerly (it is light); everything that pulls in
jax is imported on first use, so `cnnpipe decode` and preprocess worker
processes start fast and never initialise an XLA backend.
"""

from __future__ import annotations

import importlib
from typing import Any

from cnnpipe.images.decode import DecodeError, Planes, read_image

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, see module docstring).
_LAZY = {
    "preprocess": "cnnpipe.datasets.preprocess",
    "load_store": "cnnpipe.datasets.store",
    "load_config": "cnnpipe.config",
    "build_model": "cnnpipe.models.cnn",
    "train_and_evaluate": "cnnpipe.training.train",
    "load_run": "cnnpipe.runs.load",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnpipe' has no attribute {name!r}")


__all__ = ["DecodeError", "Planes", "read_image", "__version__", *_LAZY]
