"""Using a trained run: load it, evaluate it, predict with it (stage 5).

Owns: `load` (`load_run`: the model restored from a run directory without an
optimizer; `Run.prepare` and `Run.predict` through the training image path),
`predict` (`cnnpipe predict` at scale: files, folders and @lists streamed through
the worker pool to the device), `outputs` (CSV / JSON Lines rows) and `evaluate`
(`cnnpipe evaluate` on the run's own or other data).

May import: images, datasets, models, training, and the top-level foundation modules.

This `__init__` imports nothing, so importing one module of the package never
imports the rest (and never jax where a module does not need it).
"""
