"""adaspec on Ray Serve, end to end on this machine: a local Ray cluster (2 CPUs), 2 replicas of the
tiny models behind Ray's HTTP proxy on a free 127.0.0.1 port. Answers equal a single `adaspec
serve`'s, both replicas serve, one conversation stays on one replica, metrics are labelled by
replica, and a replica killed mid-run fails its requests cleanly and is replaced. The cluster is
shut down at the end. Skipped without the `ray` extra."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from adaspec.config import AdaspecError  # noqa: E402
from adaspec.server import ServerSettings  # noqa: E402
from adaspec.server.ray_serve import (REPLICA_HEADER, REPORT_S, RayConfig, affinity_key,  # noqa: E402
                                      build_app, merge_metrics, shutdown)
from test_server import LiveServer, sse_events  # noqa: E402

TINY = {"target": "tiny", "drafter": "tiny-draft"}
SETTINGS = dict(defaults={"max_new_tokens": 8}, queue_size=16, request_timeout=60)
HEADER = REPLICA_HEADER.decode()


# --- without a cluster -------------------------------------------------------------------------------


def test_a_conversation_keeps_its_key_as_it_grows():
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a heap?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "a tree"}, {"role": "user", "content": "and a stack?"}]
    other = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a queue?"}]
    key = affinity_key(json.dumps({"messages": turn1}).encode())
    assert key and key == affinity_key(json.dumps({"messages": turn2, "stream": True}).encode())
    assert key != affinity_key(json.dumps({"messages": other}).encode())
    long = "x" * 5000
    assert affinity_key(json.dumps({"prompt": long}).encode()) == affinity_key(json.dumps({"prompt": long + "y"}).encode())
    assert affinity_key(json.dumps({"prompt": "a"}).encode()) != affinity_key(json.dumps({"prompt": "b"}).encode())
    for body in (b"not json", b"[1, 2]", b'{"model": "tiny"}', b"\xff"):
        assert affinity_key(body) is None


def test_merged_metrics_label_every_sample_by_replica():
    one = '# TYPE adaspec_generated_tokens_total counter\nadaspec_generated_tokens_total 5.0\n'
    two = '# TYPE adaspec_generated_tokens_total counter\nadaspec_generated_tokens_total 7.0\n'
    samples = {(s.name, s.labels["replica"]): s.value
               for f in text_string_to_metric_families(merge_metrics({"a": one, "b": two}).decode()) for s in f.samples}
    assert samples == {("adaspec_generated_tokens_total", "a"): 5.0, ("adaspec_generated_tokens_total", "b"): 7.0}


@pytest.mark.parametrize("bad, message", [
    (dict(replicas=0), "replicas must be an integer >= 1"),
    (dict(cpus_per_replica=0), "cpus-per-replica must be"),
    (dict(min_replicas=1), "--min-replicas needs --max-replicas"),
    (dict(min_replicas=3, max_replicas=2), "autoscaling needs"),
    (dict(max_replicas=0), "autoscaling needs"),
])
def test_bad_replica_settings_are_refused(bad, message):
    with pytest.raises(AdaspecError, match=message):
        RayConfig(TINY, **bad).validate()


# --- a local cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="adaspec")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(RayConfig(TINY, replicas=2, health_check_period_s=1), ServerSettings(**SETTINGS)),
                  name="adaspec", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        shutdown("adaspec")
    assert not ray.is_initialized()
    with pytest.raises(httpx.ConnectError):  # the proxy is gone with the cluster
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.fixture(scope="module")
def single():
    """One `adaspec serve` app (same models, same settings) for the expected answers."""
    with LiveServer(**SETTINGS) as s:
        yield s


def ask(url: str, body: dict, timeout: float = 60) -> dict:
    """One request, streamed or not: its status, replica, text and, for streams, the events."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with httpx.stream("POST", url + path, json=body, timeout=timeout) as r:
        out = {"status": r.status_code, "replica": r.headers.get(HEADER)}
        if not body.get("stream"):
            out["json"] = json.loads(r.read())
            choice = out["json"].get("choices", [{}])[0]
            out["text"] = choice.get("text", choice.get("message", {}).get("content"))
            return out
        events = sse_events(r.iter_lines())
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    out["events"] = events
    out["text"] = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
                          for c in chunks)
    return out


def concurrently(fn, items: list) -> list:
    results = [None] * len(items)

    def run(i):
        try:
            results[i] = fn(items[i])
        except Exception as e:  # reported as a result: a test asserts on every one
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return results


def requests_mix(n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 2:
            out.append({"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 12,
                        "temperature": 0, "stream": i % 4 == 1})
        else:
            out.append({"prompt": f"The number {i} is", "max_tokens": 12, "temperature": 0, "stream": i % 4 == 0})
    return out


def test_concurrent_answers_equal_one_server_and_both_replicas_serve(cluster, single):
    bodies = requests_mix(12)
    got = concurrently(lambda b: ask(cluster, b), bodies)
    want = [ask(single.url, b) for b in bodies]
    for body, g, w in zip(bodies, got, want):
        assert not isinstance(g, Exception), g
        assert g["status"] == 200 and g["text"] == w["text"], (body, g, w)
        if body["stream"]:
            assert g["events"][-1] == "[DONE]" and g["events"][-2]["speculation"]["target_forwards"] > 0
        else:
            assert g["json"]["speculation"] == {**g["json"]["speculation"], "method": "cmasd", "lossless": True}
    assert len({g["replica"] for g in got}) == 2


def test_errors_keep_their_shape_through_the_proxy(cluster):
    r = httpx.post(cluster + "/v1/completions", json={"prompt": "hi", "max_tokens": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(cluster + "/v1/completions", json={"prompt": "hi", "model": "other"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_one_conversation_stays_on_its_replica(cluster):
    seen = {}
    for turn in range(3):
        for c in range(4):
            messages = [{"role": "user", "content": f"conversation {c}"}]
            for t in range(turn):
                messages += [{"role": "assistant", "content": f"answer {t}"}, {"role": "user", "content": f"more {t}"}]
            r = ask(cluster, {"messages": messages, "max_tokens": 4})
            assert r["status"] == 200
            seen.setdefault(c, set()).add(r["replica"])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen


def fleet_metrics(url: str) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, s.labels.get("replica")): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if not s.labels.keys() - {"replica"}}


def total(metrics: dict[tuple, float], name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def settled_metrics(url: str, name: str, until=None, timeout: float = 20.0) -> dict[tuple, float]:
    """The fleet's metrics once the total of `name` satisfies `until`, or, without one, once two reads
    1.5 report periods apart agree on it (every replica reports each REPORT_S, and a busy machine can
    delay a report past one period). Returns the last read at the timeout."""
    deadline, last = time.monotonic() + timeout, fleet_metrics(url)
    while time.monotonic() < deadline:
        if until is not None and until(total(last, name)):
            break
        time.sleep(1.5 * REPORT_S)
        now = fleet_metrics(url)
        if until is None and total(now, name) == total(last, name):
            return now
        last = now
    return last


def test_metrics_of_every_replica_labelled_by_replica(cluster):
    generated = "adaspec_generated_tokens_total"
    before = settled_metrics(cluster, generated)  # every replica has reported since the last requests
    got = concurrently(lambda b: ask(cluster, b), requests_mix(6))
    tokens = sum(g["json"]["usage"]["completion_tokens"] if "json" in g
                 else g["events"][-2]["usage"]["completion_tokens"] for g in got)
    after = settled_metrics(cluster, generated, until=lambda n: n >= total(before, generated) + tokens)
    assert total(after, generated) - total(before, generated) == tokens
    assert len({r for (n, r) in after if n == "adaspec_drafted_tokens_total"}) == 2
    assert total(after, "adaspec_target_forwards_total") > total(before, "adaspec_target_forwards_total")


def replica_states() -> dict:
    app = serve.status().applications["adaspec"]
    return dict(app.deployments["Replica"].replica_states)


def test_a_killed_replica_fails_its_requests_cleanly_and_is_replaced(cluster):
    long = [{"prompt": f"story {i}", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": i % 2 == 0}
            for i in range(6)]
    results: list = []
    streaming: list = []  # replicas in the middle of a stream, in the order the streams began
    lock = threading.Lock()

    def run(body):
        with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=60) as r:
            replica = r.headers.get(HEADER)
            if body["stream"] and replica:  # a stream's headers come with its first token
                with lock:
                    streaming.append(replica)
            out = {"status": r.status_code, "replica": replica}
            if r.headers["content-type"].startswith("text/event-stream"):
                out["events"] = sse_events(r.iter_lines())
            else:  # a JSON answer, or an error before a stream began
                out["json"] = json.loads(r.read())
        return out

    threads = [threading.Thread(target=lambda b=b: results.append(_safe(run, b))) for b in long]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    # A replica may answer a non-streamed request before it starts a stream (the tiny models run one
    # request at a time), so wait for any stream to begin, whichever replica serves it.
    while not streaming:
        assert time.monotonic() < deadline, f"no stream started: {results}"
        time.sleep(0.05)
    victim = streaming[0]
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung after the kill"
    assert len(results) == len(long) and not any(isinstance(r, Exception) for r in results), results
    failed = broken_streams = 0
    for r in results:
        if "events" in r:
            assert r["status"] == 200 and r["events"][-1] == "[DONE]"
            last = r["events"][-2]
            if "error" in last:
                assert last["error"]["code"] == "replica_unavailable"
                broken_streams += 1
            else:
                assert last["usage"]["completion_tokens"] == 400
        elif r["status"] == 200:
            assert r["json"]["usage"]["completion_tokens"] == 400
        else:
            assert r["status"] == 503 and r["json"]["error"]["code"] == "replica_unavailable", r
            failed += 1
    assert broken_streams >= 1, results  # the victim's stream had begun: it ends with an error event
    assert failed + broken_streams < len(long)  # the other replica's requests were answered
    deadline = time.monotonic() + 90
    while replica_states() != {"RUNNING": 2}:
        assert time.monotonic() < deadline, f"the replica was not replaced: {replica_states()}"
        time.sleep(0.5)
    after = concurrently(lambda b: ask(cluster, b), requests_mix(8))
    assert all(r["status"] == 200 for r in after)
    assert victim not in {r["replica"] for r in after} and len({r["replica"] for r in after}) == 2


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def test_the_serve_run_builder_refuses_unknown_arguments():
    from adaspec.server.ray_serve import app_builder

    with pytest.raises(AdaspecError, match=r"unknown arguments \['replica'\]"):
        app_builder({"target": "tiny", "drafter": "tiny-draft", "replica": "2"})
    with pytest.raises(AdaspecError, match="replicas must be an integer >= 1"):
        app_builder({"target": "tiny", "replicas": "0"})
