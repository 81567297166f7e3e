"""The server with continuous batching (server/worker.BatchWorker) on Llama-family toy models the
batched runtime runs: concurrent requests decode together and answer exactly what each answers
alone, a client that leaves frees its slot within a step, and admission stays bounded (429)."""

from __future__ import annotations

import socket
import threading
from collections import Counter

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from test_server import LiveServer, sse_events, wait_until  # noqa: E402

from adaspec.api import Engine  # noqa: E402
from adaspec.models.fast import FastDecoder  # noqa: E402
from adaspec.models.hf import HFAdapter  # noqa: E402
from adaspec.models.quant import quantize_adapter  # noqa: E402
from adaspec.models.tiny import EOS, ByteTokenizer  # noqa: E402


def _qwen(layers: int, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259, max_position_embeddings=1024, eos_token_id=EOS,
                         tie_word_embeddings=True)
    return quantize_adapter(HFAdapter(Qwen2ForCausalLM(config).eval(), f"qwen-{layers}"), "int8")


def batch_engine() -> Engine:
    target = _qwen(2)
    drafter = FastDecoder(_qwen(1).model, "qwen-1", exact_rows=False)
    return Engine(target, drafter, ByteTokenizer(), chat=False)


@pytest.fixture(scope="module")
def server():
    with LiveServer(batch_engine(), queue_size=32, request_timeout=60, max_batch=8) as s:
        yield s


def _complete(server, prompt: str, stream: bool, out: dict, max_tokens: int = 24) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "speculation": {"method": "fixed", "k": 3}}
    if not stream:
        out[prompt] = server.post("/v1/completions", body).json()["choices"][0]["text"]
        return
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = sse_events(r.iter_lines())
    out[prompt] = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))


def test_concurrent_requests_decode_together_and_answer_as_they_would_alone(server):
    prompts = [f"request {i}: " + "xyz" * i for i in range(8)]
    alone: dict = {}
    for i, p in enumerate(prompts):
        _complete(server, p, stream=i % 2 == 0, out=alone)
    batched_before = server.metric("adaspec_batch_size_sum") - server.metric("adaspec_batch_size_count")
    together: dict = {}
    threads = [threading.Thread(target=_complete, args=(server, p, i % 2 == 1, together)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone and all(alone.values())
    # some forwards carried more than one sequence: sum of batch sizes above the number of forwards
    assert server.metric("adaspec_batch_size_sum") - server.metric("adaspec_batch_size_count") > batched_before
    assert server.metric("adaspec_rows_per_forward_count") > 0
    assert server.metric("adaspec_generations_total", outcome="length") >= 16


def test_a_client_that_leaves_frees_its_slot_within_a_step(server):
    def running() -> int:
        return httpx.get(server.url + "/health", timeout=5).json()["running"]

    wait_until(lambda: running() == 0)
    cancelled = server.metric("adaspec_generations_total", outcome="cancelled")
    body = {"prompt": "long", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert running() == 1
    wait_until(lambda: running() == 0, timeout=5)
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed client that gives up
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    wait_until(lambda: running() == 0, timeout=5)
    wait_until(lambda: server.metric("adaspec_generations_total", outcome="cancelled") == cancelled + 2)


def test_admission_is_bounded_with_429_and_retry_after():
    with LiveServer(batch_engine(), queue_size=1, request_timeout=60, max_batch=2) as s:
        codes, retry = [], []

        def send() -> None:
            r = s.post("/v1/completions", {"prompt": "go", "max_tokens": 300, "ignore_eos": True})
            codes.append(r.status_code)
            if r.status_code == 429:
                retry.append(r.headers.get("Retry-After"))

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # at most max_batch running + queue_size waiting are taken; the rest are told when to retry
        assert 2 <= codes.count(200) <= 3 and codes.count(200) + codes.count(429) == 6, codes
        assert all(r and int(r) >= 1 for r in retry)


def test_a_soak_run_with_cancellations_loses_nothing_and_leaves_the_server_idle(server):
    """adaspec.bench.load.soak against the batching server: clients that keep sending, half of
    their requests abandoned (streams closed after the first text, plain requests given up after
    50 ms). Every request is answered or left by its client, and no abandoned one keeps a slot."""
    from adaspec.bench import load

    wait_until(lambda: httpx.get(server.url + "/health", timeout=5).json()["running"] == 0)
    before = server.metrics()
    target = load.Server.at(server.url)
    report = load.soak(target, clients=4, seconds=3, max_tokens=300, cancel_every=2, abandon_after_s=0.05,
                       timeout_s=60, extra={"ignore_eos": True})

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return server.metrics().get(key, 0.0) - before.get(key, 0.0)

    assert report.ok, (report.outcomes, report.problems)
    assert report.outcomes["completed"] > 0 and report.outcomes["abandoned"] > 0
    assert report.sent == sum(report.outcomes[o] for o in ("completed", "abandoned", "busy"))
    assert report.tokens == 300 * report.outcomes["completed"]
    assert report.idle_after is True
    # the server saw every request, and cancelled the generations whose clients left before their end
    wait_until(lambda: sum(delta("adaspec_requests_total", endpoint="/v1/chat/completions", status=str(code))
                           for code in (200, 429, 499)) == report.sent)
    assert 0 < delta("adaspec_generations_total", outcome="cancelled") <= report.outcomes["abandoned"]
    assert delta("adaspec_generations_total", outcome="length") >= report.outcomes["completed"]


def test_the_load_generator_counts_what_goes_wrong():
    """A request that gets no answer is lost, a 5xx and a 429 are told apart (load.request)."""
    from adaspec.bench import load

    with socket.socket() as s:  # a port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        nobody = load.Server(f"http://127.0.0.1:{s.getsockname()[1]}", "m")
    lost = load.request(nobody, "hi", 4, timeout_s=5)
    assert lost.outcome == "lost" and "ConnectError" in lost.why
    assert load._refused(httpx.Response(429, headers={"Retry-After": "3"}), 0.0).retry_after == 3.0
    assert load._refused(httpx.Response(503, text="down"), 0.0).outcome == "server_error"
    assert load._refused(httpx.Response(400, text="bad"), 0.0).outcome == "client_error"
    assert not load.SoakReport(1.0, 1, outcomes=Counter(lost=1)).ok
    assert load.SoakReport(1.0, 1, outcomes=Counter(completed=3, busy=2), idle_after=True).ok
