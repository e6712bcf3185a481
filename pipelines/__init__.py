"""Everything Ray, thin over ``calm_core``: ``data/`` (Ray Data ingest, chunks, latents), ``train/``
(one Ray Train + DeepSpeed loop and its stages), ``eval/``, ``serve/``, the run directory
(``storage``) and the artifact claim rule (``claim``); docs/PIPELINE.md "Layout".

Importing this package sets the environment every Ray process needs
(before ``ray`` is imported): ``RAY_AUTH_MODE=token`` unless set (a job's own local Ray listens on
every interface; with a token, Ray makes ``~/.ray/auth_token`` and nobody else can submit to it;
the test suite sets ``disabled``), and usage stats off (they would try to reach the network). Ray Serve's
throughput-optimised mode (user code on the replica's main event loop, gRPC between replicas:
+22% tokens/s served at 32 concurrent requests on 2 CPUs, docs/BENCHMARKS.md) is on, without its
direct ingress (which opens an HTTP port per ingress replica for an HAProxy front; here the one
proxy stays the entry point). These reach the Ray processes a job starts itself; a cluster started
with ``ray start`` sets them there (cluster/).
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
