"""Everything Ray: corpus ingest on Ray Data, Ray Train + DeepSpeed loops, run-directory I/O.

Thin over ``calm_core``. Importing this package sets the environment every Ray process needs
(before ``ray`` is imported): Ray 2.60 enables token auth after the first local ``ray.init``
unless ``RAY_AUTH_MODE`` is set, and usage stats would try to reach the network.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
