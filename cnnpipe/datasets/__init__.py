"""Folders and tfds datasets -> dataset stores -> fixed-shape batches (stage 2).

Owns: `store` (the on-disk format, atomic writer), `folders` (folder scan, stable
split), `workers` (a process pool that survives worker deaths), `progress`,
`convert` (one file in a worker: probe, or read + hash + prepare), `native_planes`
(the plane count of a native store), `report` (report.json and its summary), `preprocess` (folder ->
store), `tfds` (tfds -> store cache), `dataset` (`Dataset`, `Split`, a run's
`dataset.json`), `shapes` (the built-in synthetic data), `sources` (`data.source`
-> `Dataset`) and `batches` (deterministic host batches, prefetch).

Nothing here imports jax: preprocess workers start fast.

May import: images, and the top-level foundation modules.

This `__init__` imports nothing, so importing one module of the package never
imports the rest (and never jax where a module does not need it).
"""
