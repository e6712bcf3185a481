"""Everything Ray, thin over ``calm_core``: ``data/`` (Ray Data ingest, chunks, latents), ``train/``
(one Ray Train + DeepSpeed loop and its stages), ``eval/``, ``serve/``, ``sweep/``, the run directory
(``storage``), the artifact claim rule (``claim``), the official format (``official``, ``hub``,
``parity``); docs/PIPELINE.md "Layout".

Importing it changes nothing in the process: the environment Ray's processes need is set where a
job starts or joins Ray (``pipelines.ray_env.ray_environment``).
"""
