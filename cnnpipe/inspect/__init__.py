"""What a trained run learned (stage 6): `cnnpipe inspect`.

Owns: `featuremaps` (activations, Grad-CAM, per-plane attribution, first-layer
kernels: pure functions of a model), `report` (figures and the HTML page) and
`mistakes` (the worst-N validation images, most-confused class pairs).

May import: images, datasets, models, training, runs, and the top-level foundation modules.

This `__init__` imports nothing, so importing one module of the package never
imports the rest (and never jax where a module does not need it).
"""
