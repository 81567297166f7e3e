"""adaspec replicas behind one OpenAI endpoint on Ray Serve (`adaspec serve --ray`; docs/scaling.md).

    Ray's HTTP proxy -> Front (one small ingress, no CPU reserved) -> Replica x N

Each `Replica` loads the pair once, pins torch to its share of the cores and runs the very app of
`adaspec serve` (server/app.create_app: routes, validation, SSE, speculation statistics, API key,
error shapes), called in process over ASGI: one code path serves both. The `Front` reads the
body, derives the request's conversation key (`affinity_key`) and relays the ASGI exchange to a
replica through a deployment handle whose router (`AffinityRouter`) sends one conversation to the
replica that served it, unless that replica is much busier than another. A replica that dies
mid-answer ends its requests cleanly: 503 before the status line, an error event then [DONE] in a
stream that has begun. GET /metrics answers every live replica's metrics labelled `replica`,
through a small named actor (`MetricsHub`) that each replica reports to every second.

    from ray import serve
    from adaspec.server import ServerSettings
    from adaspec.server.ray_serve import RayConfig, build_app
    serve.run(build_app(RayConfig({"target": "tiny", "drafter": "tiny-draft"}, replicas=2),
                        ServerSettings()), route_prefix="/")

Needs the `ray` extra (`pip install -e ".[ray]"`); nothing else in adaspec imports this module
unless asked to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from adaspec.config import AdaspecError
from adaspec.server.app import ServerSettings
from adaspec.server.schemas import APIError

log = logging.getLogger("adaspec.server")
REPLICA_HEADER = b"x-adaspec-replica"  # which replica answered (tests, debugging)
HUB = "adaspec-metrics"  # the MetricsHub's actor name, one per application: f"{HUB}-{app_name}"
NAMESPACE = "adaspec"
REPORT_S = 1.0  # how often a replica reports its metrics to the hub
STALE_S = 10.0  # a replica silent this long is gone from /metrics
KEY_CHARS = 2048  # the conversation key covers at most this much of its opening


@dataclass
class RayConfig:
    load: dict  # adaspec.load keywords, dtype by name ("float32"): cli.load_options
    replicas: int = 2  # fixed number of replicas, unless max_replicas is set
    min_replicas: int | None = None  # autoscaling bounds (both or max alone: min defaults to 1)
    max_replicas: int | None = None
    cpus_per_replica: int = 1  # CPUs Ray reserves per replica = torch threads
    pin: bool = True  # pin each replica to its own cores (by its rank on the node)
    app_name: str = "adaspec"
    health_check_period_s: float = 5.0
    affinity_slack: int = 2  # a conversation's replica is skipped when it runs this many more than another

    def validate(self) -> "RayConfig":
        for name in ("replicas", "cpus_per_replica"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise AdaspecError(f"{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.min_replicas is not None and self.max_replicas is None:
            raise AdaspecError("--min-replicas needs --max-replicas (autoscaling between the two)")
        if self.max_replicas is not None:
            low = 1 if self.min_replicas is None else self.min_replicas
            if not (isinstance(low, int) and low >= 0 and isinstance(self.max_replicas, int)
                    and self.max_replicas >= max(1, low)):
                raise AdaspecError(f"autoscaling needs 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, "
                                   f"got {self.min_replicas} and {self.max_replicas}")
        if not self.affinity_slack >= 0:
            raise AdaspecError(f"affinity_slack must be >= 0, got {self.affinity_slack!r}")
        return self

    def fewest_replicas(self) -> int:
        return self.replicas if self.max_replicas is None else max(1, self.min_replicas or 1)


# --- which replica: one conversation to the replica that served it ----------------------------------


def affinity_key(body: bytes) -> str | None:
    """A conversation's key: its opening (system messages and the first user message of a chat, or
    the prompt's first KEY_CHARS characters), which every later turn repeats. None: not a
    generation body (the replica answers it, errors included)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    if isinstance(messages := obj.get("messages"), list):
        opening = []
        for m in messages:
            opening.append(m)
            if isinstance(m, dict) and m.get("role") == "user":
                break
        text = json.dumps(opening, sort_keys=True, ensure_ascii=False)
    elif isinstance(prompt := obj.get("prompt"), str | list):
        text = json.dumps(prompt, ensure_ascii=False)
    else:
        return None
    return hashlib.sha256(text[:KEY_CHARS].encode("utf-8", "surrogatepass")).hexdigest()[:32]


class AffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's power-of-two-choices router, preferring for a keyed request the replica that
    served its conversation: that replica's drafter pool has learnt this conversation's acceptance
    (and keeps its caches warm where the engine keeps any). The preference yields when that replica
    runs `slack` more requests than the least busy one, or is full."""

    def initialize_state(self, slack: int = 2, capacity: int = 4096, **kwargs) -> None:
        self.slack, self.capacity = slack, capacity
        self.seen: OrderedDict[str, ReplicaID] = OrderedDict()  # key -> replica, least recent first

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        key = _key_of(pending_request)
        preferred = self.seen.get(key) if key else None
        mine = [r for r in candidate_replicas if r.replica_id == preferred]
        if not mine or not self.select_available_replicas(mine):
            return ranks
        cache = self.replica_queue_len_cache
        load = {r.replica_id: cache.get(r.replica_id) or 0 for r in candidate_replicas}
        if load[preferred] > min(load.values()) + self.slack:
            return ranks
        return [mine, *ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        if key := _key_of(pending_request):
            self.seen[key] = replica_id
            self.seen.move_to_end(key)
            while len(self.seen) > self.capacity:
                self.seen.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self.seen.items() if r == replica_id]:
            del self.seen[key]


def _key_of(pending_request: PendingRequest | None) -> str | None:
    return pending_request.kwargs.get("affinity") if pending_request is not None else None


# --- metrics of every replica, labelled by replica ---------------------------------------------------


@ray.remote(num_cpus=0)
class MetricsHub:
    """The latest Prometheus text of each replica (a named actor, one per application)."""

    def __init__(self):
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        return {r: text for r, (t, text) in self.texts.items() if now - t < STALE_S}


def hub(app_name: str):
    return MetricsHub.options(name=f"{HUB}-{app_name}", namespace=NAMESPACE, get_if_exists=True,
                              lifetime="detached").remote()


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Several replicas' Prometheus texts as one, each sample labelled `replica`."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)

    class Merged:
        def collect(self):
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


# --- the deployments ----------------------------------------------------------------------------------


def _pin(threads: int, pin: bool) -> str:
    """torch threads = this replica's CPUs; with `pin`, its own cores by its rank on the node."""
    import torch

    torch.set_num_threads(threads)
    if not pin or not hasattr(os, "sched_setaffinity"):
        return "unpinned"
    cores = sorted(os.sched_getaffinity(0))
    rank = serve.get_replica_context().rank.local_rank
    share = cores[rank * threads:(rank + 1) * threads]
    if len(share) < threads:  # more replicas on this node than cores: leave it to the OS
        return "unpinned"
    os.sched_setaffinity(0, share)
    return ",".join(map(str, share))


@serve.deployment
class Replica:
    """One engine and the app of `adaspec serve`; answers relayed ASGI exchanges (`handle`)."""

    def __init__(self, load: dict, settings: ServerSettings, threads: int, pin: bool, app_name: str):
        import torch

        import adaspec
        from adaspec.models.openmp import release_pool
        from adaspec.server.app import create_app

        cores = _pin(threads, pin)
        self.id = serve.get_replica_context().replica_id.unique_id
        engine = adaspec.load(**{**load, "dtype": getattr(torch, load.get("dtype", "float32"))})
        self.hub = hub(app_name)
        self.app = create_app(engine, settings, render_metrics=self._fleet_metrics)
        self.service = self.app.state.service
        release_pool(serial=True)  # this thread loaded the models; the worker's pool must be the only one
        self.service.worker.start()  # the app's lifespan, which no ASGI server runs here
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="adaspec-metrics-report", daemon=True).start()
        log.info("replica %s: %s on cores %s, %d thread(s)", self.id, engine.target_name, cores, threads)

    async def handle(self, scope: dict, body: bytes, affinity: str | None = None):
        """Run one HTTP exchange through the app: yields ("start", status, headers), then body chunks.
        Closing the generator (its client left) is the app's http.disconnect."""
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.create_task(self.app(dict(scope), receive, sent.put))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    yield ("start", message["status"], [*message.get("headers", []), (REPLICA_HEADER, self.id.encode())])
                elif message.get("body"):
                    yield message["body"]
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    break
        finally:
            gone.set()
            try:
                await asyncio.wait_for(task, 10)
            except Exception:  # the app logs its own failures; a stuck one is cancelled
                pass

    def check_health(self) -> None:
        """Ray Serve's health check: the engine's worker thread must still run."""
        if not self.service.worker.alive():
            raise RuntimeError("the generation worker has stopped")

    async def _fleet_metrics(self, metrics) -> bytes:
        texts = await self.hub.collect.remote()
        texts[self.id] = metrics.render().decode()  # this replica's own, fresh
        return merge_metrics(texts)

    def _report(self) -> None:
        while not self._stop.wait(REPORT_S):
            try:
                self.hub.put.remote(self.id, self.service.metrics.render().decode())
            except Exception:  # the hub is gone (shutdown): metrics are best effort
                return

    def __del__(self) -> None:
        self._stop.set()
        try:
            self.hub.drop.remote(self.id)
            self.service.shutdown()
        except Exception:
            pass


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Front:
    """The ingress behind Ray's HTTP proxy: reads the body, relays the exchange to a replica by its
    conversation key, and answers for a replica that cannot (full, gone, died mid-answer)."""

    def __init__(self, replica):
        self.replica = replica.options(stream=True)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        scope = {k: v for k, v in request.scope.items() if k in _SCOPE_KEYS}
        key = affinity_key(body) if request.method == "POST" else None
        gen = self.replica.handle.remote(scope, body, affinity=key)
        try:
            _, status, headers = await gen.__anext__()
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception as e:
            return _unavailable(e).response()
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
        response = StreamingResponse(_relay(gen, sse), status_code=status)
        response.raw_headers = headers  # the app's own, as it sent them
        return response


_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
               "root_path", "headers", "client", "server")


def _unavailable(e: Exception) -> APIError:
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, BackPressureError):
        return APIError(429, "every replica is busy and the queue in front of them is full: retry later",
                        type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    log.warning("replica unavailable: %s: %s", type(e).__name__, e)
    return APIError(503, f"the replica serving this request is unavailable ({type(e).__name__}): retry",
                    type="server_error", code="replica_unavailable")


async def _relay(gen, sse: bool):
    try:
        async for chunk in gen:
            yield chunk
    except asyncio.CancelledError:  # the client left: so does the replica's exchange
        gen.cancel()
        raise
    except Exception as e:  # the replica died mid-answer; a stream says so, as the app does
        if sse:
            yield f"data: {json.dumps(_unavailable(e).body())}\n\ndata: [DONE]\n\n"


# --- building and running ----------------------------------------------------------------------------


def build_app(cfg: RayConfig, settings: ServerSettings | None = None):
    """The Ray Serve application: Front -> Replica x cfg.replicas (or autoscaled between min and max
    on the requests each replica holds, running and queued)."""
    cfg.validate()
    settings = (settings or ServerSettings()).validate()
    holds = max(1, settings.max_batch) + settings.queue_size  # what one replica runs and queues itself
    scaling = {}
    if cfg.max_replicas is None:
        scaling["num_replicas"] = cfg.replicas
    else:
        scaling["autoscaling_config"] = {
            "min_replicas": 1 if cfg.min_replicas is None else cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "initial_replicas": cfg.fewest_replicas(),
            "target_ongoing_requests": max(1, settings.max_batch), "upscale_delay_s": 5, "downscale_delay_s": 60}
    replica = Replica.options(
        **scaling, ray_actor_options={"num_cpus": cfg.cpus_per_replica},
        max_ongoing_requests=holds, max_queued_requests=settings.queue_size,
        health_check_period_s=cfg.health_check_period_s, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=max(5.0, min(settings.request_timeout or 30.0, 60.0)),
        request_router_config=RequestRouterConfig(request_router_class=AffinityRouter,
                                                  request_router_kwargs={"slack": cfg.affinity_slack}),
    ).bind(cfg.load, settings, cfg.cpus_per_replica, cfg.pin, cfg.app_name)
    return Front.options(max_ongoing_requests=10_000).bind(replica)


def app_builder(args: dict):
    """For `serve run adaspec.server.ray_serve:app_builder target=... replicas=2` and Serve config
    files: every value a string, as Ray passes them."""
    args = dict(args)
    ints = {k: int(args.pop(k)) for k in ("replicas", "min_replicas", "max_replicas", "cpus_per_replica") if k in args}
    load = {k: args.pop(k) for k in ("target", "drafter", "dtype", "quant", "device") if k in args}
    if load.get("drafter") == "none":
        load["drafter"] = None
    settings = ServerSettings(api_key=args.pop("api_key", None),
                              **{k: int(args.pop(k)) for k in ("max_batch", "queue_size") if k in args})
    if args:
        raise AdaspecError(f"unknown arguments {sorted(args)}: expected target, drafter, dtype, quant, device, "
                           "replicas, min_replicas, max_replicas, cpus_per_replica, max_batch, queue_size, api_key")
    return build_app(RayConfig(load, **ints), settings)


def start(cfg: RayConfig, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None) -> str:
    """Join the Ray cluster at `address` (None: start one on this machine), start Serve's HTTP proxy
    on host:port and deploy; returns the endpoint's URL once every replica is up."""
    cfg.validate()
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.fewest_replicas() * cfg.cpus_per_replica
    if need > cpus:
        shutdown(cfg.app_name)
        raise AdaspecError(f"{cfg.fewest_replicas()} replica(s) x {cfg.cpus_per_replica} CPU need {need} CPUs but the "
                           f"Ray cluster has {cpus:g}: lower --replicas or --cpus-per-replica, or add nodes")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, settings), name=cfg.app_name, route_prefix="/")
    return f"http://{host}:{port}"


def shutdown(app_name: str = "adaspec") -> None:
    """Delete the application, stop Serve and the metrics hub, and leave Ray (a cluster this
    process started stops with it)."""
    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
        ray.kill(ray.get_actor(f"{HUB}-{app_name}", namespace=NAMESPACE))
    except ValueError:  # no hub
        pass
    finally:
        ray.shutdown()


def serve_forever(cfg: RayConfig, settings: ServerSettings, host: str, port: int, address: str | None) -> None:
    """`adaspec serve --ray`: start, wait for Ctrl-C or SIGTERM, shut down."""
    done = threading.Event()
    try:
        url = start(cfg, settings, host, port, address)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
            signal.signal(sig, lambda *_: done.set())
        print(f"adaspec: serving on {url} with Ray Serve ({_replicas_line(cfg)})", flush=True)
        done.wait()
    finally:
        shutdown(cfg.app_name)


def _replicas_line(cfg: RayConfig) -> str:
    per = f"{cfg.cpus_per_replica} CPU each"
    if cfg.max_replicas is None:
        return f"{cfg.replicas} replica(s), {per}"
    return f"{cfg.min_replicas or 1}..{cfg.max_replicas} replicas (autoscaling), {per}"


__all__ = ["RayConfig", "build_app", "app_builder", "start", "shutdown", "serve_forever", "affinity_key",
           "merge_metrics", "AffinityRouter"]
