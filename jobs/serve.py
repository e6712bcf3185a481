#!/usr/bin/env python
"""Serve the trained models of a run (RUN/calm, RUN/baseline) over HTTP with Ray Serve, behind an
OpenAI-compatible API: POST /v1/completions (streaming with "stream": true), GET /v1/models,
GET /health. Binds to 127.0.0.1 unless --host says otherwise; set the environment variable named by
serve.api_key_env (default CALM_API_KEY) to require "Authorization: Bearer <key>".

    python jobs/serve.py --run runs/demo
    python jobs/serve.py --run runs/small --port 8080 serve.max_replicas=2 serve.device=cuda
    python jobs/serve.py --run runs/demo serve.direct_ingress=true   # no proxy hop (docs/SERVING.md)
"""

if not __package__:  # python jobs/<job>.py from a checkout (installed: the calm_jobs package)
    import _bootstrap  # noqa: F401

import argparse
import os
import time

from pipelines.cli import EPILOG, job_main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory or URI holding calm/ and/or baseline/")
    p.add_argument("--config", default="demo", help="config whose serve section applies (default: demo)")
    p.add_argument("--host", default=None, help="address to bind (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port, 8000)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. serve.max_replicas=2")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from pipelines.ray_env import ray_environment

    ray_environment()  # before anything imports ray (Serve reads its mode when it is imported)
    from calm_core.config import load_config
    from calm_core.errors import ConfigError
    from pipelines.serve.app import build_app, direct_ingress, served_kinds
    from pipelines.storage import RunDir

    overrides = [*args.overrides, *([f"serve.host={args.host}"] if args.host else []),
                 *([f"serve.port={args.port}"] if args.port else [])]
    cfg = load_config(args.config, overrides)
    kinds = served_kinds(RunDir(args.run))  # no model: a one-line error before Ray starts
    from ray import serve

    from pipelines.ray_env import free_port, init_ray

    proxy_port = cfg.serve.port
    if cfg.serve.direct_ingress:
        if os.environ.get("RAY_ADDRESS") and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
            raise ConfigError("serve.direct_ingress=true needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and "
                              "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT/MAX_HTTP_PORT on the cluster's nodes "
                              "(set them on `ray start`; docs/SERVING.md), or leave RAY_ADDRESS unset")
        direct_ingress(cfg.serve.port)
        proxy_port = free_port(cfg.serve.host)  # Serve's proxy starts anyway; it must not take the port
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": proxy_port})
    app = build_app({"run": args.run, "config": args.config, **dict(o.split("=", 1) for o in overrides)})
    serve.run(app, name="calm", route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    how = " (direct ingress)" if cfg.serve.direct_ingress else ""
    print(f"[serve] serving {', '.join(kinds)} from {args.run} at {url}/v1{how} (Ctrl-C stops)", flush=True)
    print(f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{kinds[0]}\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}}'", flush=True)
    try:
        while True:
            time.sleep(1)
    finally:
        serve.shutdown()


def cli() -> None:
    """The installed command (pyproject [project.scripts])."""
    raise SystemExit(job_main(main))


if __name__ == "__main__":
    cli()
