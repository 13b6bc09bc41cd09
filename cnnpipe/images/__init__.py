"""Image files -> exact channel planes -> model-ready pixels (stage 1 of the data path).

Owns: `formats` (per-format decoders, magic bytes, codec messages), `decode`
(bytes -> `Planes`: orientation, channel and alpha policies, bit depth kept) and
`transform` (the one image path: match planes, promote 8 -> 16 bits exactly,
resize; shared by preprocess, the dataset caches, predict and inspect) with
`resample` (its exact antialiased resize through Pillow).

May import: the top-level foundation modules (`config`, `files`, `fdcapture`).

This `__init__` imports nothing, so importing one module of the package never
imports the rest (and never jax where a module does not need it).
"""
