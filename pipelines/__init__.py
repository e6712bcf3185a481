"""Everything Ray, thin over ``calm_core``: ``data/`` (Ray Data ingest, chunks, latents), ``train/``
(one Ray Train + DeepSpeed loop and its stages), ``eval/``, ``serve/``, the run directory
(``storage``) and the artifact claim rule (``claim``); docs/PIPELINE.md "Layout".

Importing this package sets the environment every Ray process needs
(before ``ray`` is imported): Ray 2.60 enables token auth after the first local ``ray.init``
unless ``RAY_AUTH_MODE`` is set, and usage stats would try to reach the network.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
