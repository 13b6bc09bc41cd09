"""Config + dataset -> a trained run directory (stage 4).

Owns: `mesh` (devices, mesh, per-process rows, placement), `distributed`
(jax.distributed setup, peer watch), `steps` (optimizer, jitted train/eval steps,
`forward`), `compile_cache`, `checkpoint` (named Orbax items), `runlog` (metrics
log and sink, stopwatch), `loop` (one epoch, the run's position), `metrics`
(evaluation over a split, confusion matrix), `plots` (curves, confusion matrix,
feature-map grids) and `train` (wires them: `train_and_evaluate`).

May import: images, datasets, models, and the top-level foundation modules.

This `__init__` imports nothing, so importing one module of the package never
imports the rest (and never jax where a module does not need it).
"""
