"""`adaspec serve`: load the models once and serve the OpenAI-compatible API (docs/server.md)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from adaspec.cli import add_model_args, add_option_args, load_engine, option_values
from adaspec.config import AdaspecError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
        description="Load a target and drafter once and serve /v1/completions, /v1/chat/completions, /v1/models, "
                    "/health and /metrics. The generation flags set the defaults of requests that omit them.")
    add_model_args(p)
    add_option_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: the "
                        "ADASPEC_API_KEY environment variable; neither = no key)")
    s.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while one generates; more are answered 429 (default 16)")
    s.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds from arrival (queue wait included) to the end of an answer, else 504; "
                        "0 = no limit (default 300)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted, else 413 (default 1 MiB)")
    s.add_argument("--model-name", default=None, help="model id clients send (default: the --target value)")
    s.add_argument("--max-batch", type=int, default=8,
                   help="requests decoding together, one target forward per step for all (continuous batching; "
                        "docs/server.md); 1 = one at a time (default 8)")
    s.add_argument("--max-kv-tokens", type=int, default=65536,
                   help="prompt + max_tokens summed over the batch; a request beyond it waits (default 65536)")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per request and step while others decode (default 256)")
    s.add_argument("--no-batch-drafts", action="store_false", dest="batch_drafts",
                   help="each request drafts alone, one drafter forward per token and request, instead of the "
                        "greedy requests drafting together (for comparison)")
    s.add_argument("--no-prefix-cache", action="store_false", dest="prefix_cache",
                   help="prefill every prompt's chat-template opening again instead of copying the kept one "
                        "(for comparison; outputs are the same either way)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    r = p.add_argument_group("Ray Serve (docs/scaling.md; needs `pip install -e \".[ray]\"`)")
    r.add_argument("--ray", action="store_true",
                   help="serve replicas of the engine behind Ray Serve's HTTP proxy on --host:--port, each "
                        "running this same server")
    r.add_argument("--replicas", type=int, default=2, help="number of replicas (default 2)")
    r.add_argument("--min-replicas", type=int, default=None,
                   help="autoscale between --min-replicas (default 1) and --max-replicas on the requests "
                        "each replica holds (target: --max-batch per replica)")
    r.add_argument("--max-replicas", type=int, default=None, help="upper bound of autoscaling (turns it on)")
    r.add_argument("--cpus-per-replica", type=int, default=None,
                   help="CPUs Ray reserves for each replica, which are its torch threads, pinned to its own "
                        "cores (default: --threads, else 1)")
    r.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (`auto`: the one started with `ray start` on this node); "
                        "default: start one on this machine, stopped at exit")
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    from adaspec.server.app import ServerSettings, create_app

    check_port(a.host, a.port)  # before loading weights: a busy or impossible port should not cost a model load
    settings = ServerSettings(
        method=a.method, defaults=option_values(a), api_key=a.api_key or os.environ.get("ADASPEC_API_KEY") or None,
        queue_size=a.queue_size, request_timeout=a.request_timeout, max_body_bytes=a.max_body_bytes,
        model_name=a.model_name, max_batch=a.max_batch, max_kv_tokens=a.max_kv_tokens,
        prefill_chunk=a.prefill_chunk, batch_drafts=a.batch_drafts, prefix_cache=a.prefix_cache).validate()  # before loading weights: a typo should not cost a model load
    if not settings.api_key and not _is_loopback(a.host):
        print(f"adaspec: warning: serving on {a.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    if a.ray:
        return cmd_serve_ray(a, settings)
    app = create_app(load_engine(a), settings)
    # uvicorn lets open requests finish for up to one request's time limit, then the app cancels the rest
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level,
                timeout_graceful_shutdown=int(a.request_timeout) + 1 if a.request_timeout else None)
    return 0


def cmd_serve_ray(a: argparse.Namespace, settings) -> int:
    """`adaspec serve --ray`: the same server, replicated on Ray Serve (server/ray_serve.py)."""
    try:
        from adaspec.server import ray_serve
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("ray"):
            raise
        raise AdaspecError('--ray needs Ray Serve: pip install -e ".[ray]"') from None
    from adaspec.cli import load_options

    cpus = a.cpus_per_replica if a.cpus_per_replica is not None else (a.threads or 1)
    cfg = ray_serve.RayConfig(load_options(a), replicas=a.replicas, min_replicas=a.min_replicas,
                              max_replicas=a.max_replicas, cpus_per_replica=cpus).validate()
    ray_serve.serve_forever(cfg, settings, a.host, a.port, a.ray_address)
    return 0


def check_port(host: str, port: int) -> None:
    """The address must be one this machine can listen on now."""
    if not 0 < port < 65536:
        raise AdaspecError(f"--port must be between 1 and 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as e:
        raise AdaspecError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
