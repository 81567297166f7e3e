"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback port, serving
the built-in tiny models, called with the official `openai` client, httpx, a hypothesis fuzzer
and a load generator in a separate process. Only 127.0.0.1 is ever contacted."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import adaspec  # noqa: E402
from adaspec.config import METHODS, VERIFY_RULES  # noqa: E402
from adaspec.records import Result, Stats  # noqa: E402
from adaspec.server import ServerSettings, create_app  # noqa: E402
from adaspec.server.schemas import response_body  # noqa: E402

KEY = "test-key-123"


class LiveServer:
    """create_app on the tiny models (or `engine`), served by uvicorn in a thread on a free 127.0.0.1 port."""

    def __init__(self, engine=None, **settings):
        self.app = create_app(engine or adaspec.load("tiny", "tiny-draft"), ServerSettings(**settings))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))  # bound before uvicorn starts: no race for the port
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.headers = {"Authorization": f"Bearer {settings['api_key']}"} if settings.get("api_key") else {}
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=30, **kw)

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=30, **kw)


@pytest.fixture(scope="module")
def server():
    with LiveServer(defaults={"max_new_tokens": 8}, queue_size=64, request_timeout=30,
                    max_body_bytes=64 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def limited():
    """An API key and a short time limit."""
    with LiveServer(api_key=KEY, request_timeout=1.5, queue_size=4) as s:
        yield s


@pytest.fixture(scope="module")
def engine():
    """A second copy of the server's models (same seeds, same weights) to compute expected outputs."""
    return adaspec.load("tiny", "tiny-draft")


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def sse_events(lines) -> list:
    """The data payloads of a server-sent-event stream: dicts, and the final "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int, param: str | None = "?", type: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "?":
        assert err["param"] == param, err
    if type is not None:
        assert err["type"] == type, err
    return err


# --- the openai client: outputs equal the library's -------------------------------------------------


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0


@pytest.mark.parametrize("method", ["cmasd", "ar", "fixed"])
def test_completion_matches_engine(server, engine, method):
    prompt = "The quick brown fox"
    got = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                             extra_body={"speculation": {"method": method, "k_max": 6}})
    want = engine.generate(prompt, method=method, chat=False, max_new_tokens=24, temperature=0, k_max=6)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 24)
    assert got.usage.total_tokens == want.prompt_tokens + 24
    spec = got.model_extra["speculation"]
    assert spec["method"] == method and spec["lossless"] is True
    s = want.stats
    assert (spec["drafted"], spec["accepted"], spec["target_forwards"]) == (s.drafted, s.accepted, s.target_forwards)
    assert spec["mean_accepted"] == pytest.approx(s.mean_accepted)
    assert spec["acceptance_rate"] == pytest.approx(s.acceptance_rate)
    assert spec["tokens_per_s"] > 0


def test_streamed_completion_matches_engine(server, engine):
    prompt = "Once upon a time"
    chunks = list(server.client().completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                                     stream=True))
    want = engine.generate(prompt, method="cmasd", chat=False, max_new_tokens=40, temperature=0)
    assert len(chunks) >= 3
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length" and last.usage.completion_tokens == 40
    assert last.model_extra["speculation"]["accepted"] == want.stats.accepted


def test_chat_matches_engine(server, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    client = server.client()
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    want = engine.generate(messages, method="cmasd", max_new_tokens=20, temperature=0)  # chat template applied
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens == len(engine.encode(messages))
    assert got.model_extra["speculation"]["drafted"] == want.stats.drafted

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.total_tokens == got.usage.total_tokens
    assert chunks[-1].model_extra["speculation"]["target_forwards"] == want.stats.target_forwards


def test_stop_strings_and_sampling_match_engine(server, engine):
    prompt = "Stop here"
    full = engine.generate(prompt, chat=False, max_new_tokens=24, temperature=0).text
    i = next(i for i in range(3, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    stop = [full[i:i + 2], "never-generated"]
    want = engine.generate(prompt, chat=False, max_new_tokens=24, temperature=0, stop=stop)
    got = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop)
    assert want.finish_reason == "stop" and got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == want.text == full[:full.index(stop[0])]
    # a seeded sampled request is reproducible and equals the library's
    sampled = dict(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    a = server.client().completions.create(model="tiny", prompt=prompt, **sampled)
    b = engine.generate(prompt, chat=False, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    assert a.choices[0].text == b.text


def test_null_fields_mean_the_defaults(server):
    nulls = dict.fromkeys(["model", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n", "ignore_eos",
                           "speculation", "logprobs", "user"])
    r = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2, **nulls})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_eos_is_reported_as_stop():
    r = Result(token_ids=[1, 2], text="ab", finish_reason="eos", method="cmasd", lossless=True,
               stats=Stats(new_tokens=2, target_forwards=1), prompt_tokens=3)
    body = response_body("completion", "cmpl-1", "tiny", r)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


# --- bad input: a 4xx with an OpenAI error object, never a 5xx --------------------------------------


ERRORS = [  # (path, body, status, param)
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 999]}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "speculation": {"method": "nope"}}, 400, "speculation.method"),
    ("/v1/completions", {"prompt": "x", "speculation": {"k_max": 100}}, 400, "speculation.k_max"),
    ("/v1/completions", {"prompt": "x", "speculation": {"k_min": 5, "k_max": 2}}, 400, "speculation.k_min"),
    ("/v1/completions", {"prompt": "x", "speculation": {"alpha": "high"}}, 400, "speculation.alpha"),
    ("/v1/completions", {"prompt": "x", "speculation": {"lambdas": [1, 2]}}, 400, "speculation.lambdas"),
    ("/v1/completions", {"prompt": "x", "speculation": {"bogus": 1}}, 400, "speculation.bogus"),
    ("/v1/completions", {"prompt": "x", "speculation": 3}, 400, "speculation"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"prompt": "x"}, 400, "messages"),
]


@pytest.mark.parametrize("path,body,status,param", ERRORS, ids=[json.dumps(e[1])[:40] for e in ERRORS])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    assert_error(server.post(path, body), status, param)


def test_malformed_json_and_oversized_bodies(server):
    post = lambda content, **h: httpx.post(server.url + "/v1/completions", content=content,  # noqa: E731
                                           headers={"Content-Type": "application/json", **h}, timeout=30)
    assert "malformed JSON" in assert_error(post(b'{"prompt": "x",'), 400)["message"]
    assert_error(post(b"\xff\xfe\x00garbage"), 400)
    assert_error(post(b'"just a string"'), 400)
    big = json.dumps({"prompt": "a" * 100_000}).encode()
    assert "65536 bytes" in assert_error(post(big), 413)["message"]
    assert_error(post(iter([big[:50_000], big[50_000:]])), 413)  # chunked: no Content-Length to trust
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(server.url + "/v1/completions"), 405)


@pytest.mark.parametrize("stream", [False, True])
def test_text_that_is_not_unicode_is_a_400_and_the_connection_survives(server, stream):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as client:
        for path, body, param in (("/v1/completions", {"prompt": "ab\ud800"}, "prompt"),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\udfff"}]},
                                   "messages")):
            r = client.post(path, content=json.dumps({**body, "max_tokens": 4, "stream": stream}),  # \ud800 escapes
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and ("surrogate" in err["message"] or "unicode" in err["message"])
        ok = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})  # same keep-alive connection
        assert ok.status_code == 200
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "stop": ["a\ud800"]})
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={**server.headers, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("field, off, on", [("response_format", {"type": "text"}, {"type": "json_object"}),
                                             ("tool_choice", "none", "auto"), ("parallel_tool_calls", False, True)])
def test_openai_fields_that_cannot_be_honoured_are_refused(server, field, off, on):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert server.post("/v1/chat/completions", {**body, field: off}).status_code == 200
    assert_error(server.post("/v1/chat/completions", {**body, field: on}), 400, param=field)


def test_stream_options_include_usage_adds_a_usage_chunk(server):
    body = {"prompt": "hello", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers, timeout=30) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    client = server.client()
    chunks = list(client.completions.create(model="tiny", prompt="hello", max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    assert_error(server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream_options":
                                                 {"include_usage": True}}), 400, param="stream_options")


def test_a_vanishing_top_p_samples_the_top_token_not_garbage(server, engine):
    r = server.post("/v1/completions", {"prompt": "hello", "max_tokens": 8, "temperature": 1.0, "top_p": 1e-300})
    assert r.status_code == 200
    expected = engine.generate("hello", method="ar", chat=False, max_new_tokens=8).text
    assert r.json()["choices"][0]["text"] == expected


def test_context_length_errors_say_how_many_tokens(server):
    err = assert_error(server.post("/v1/completions", {"prompt": "a" * 600}), 400, "prompt")
    assert "600 tokens" in err["message"] and "512" in err["message"] and err["code"] == "context_length_exceeded"
    err = assert_error(server.post("/v1/completions", {"prompt": "abc", "max_tokens": 510}), 400, "max_tokens")
    assert "at most 509" in err["message"]
    # without max_tokens the server's default is trimmed to what the context leaves
    r = server.post("/v1/completions", {"prompt": "a" * 508})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def mostly(valid, bad=JSON):
    """Usually a valid value, now and then a wrong one: so most bodies get past validation and run."""
    return st.integers(0, 5).flatmap(lambda i: bad if i == 0 else valid)


UNIT = st.floats(0, 1)
KNOBS = {"method": st.sampled_from(list(METHODS)), "k": st.integers(1, 64), "k_min": st.integers(1, 8),
         "k_max": st.integers(1, 64), "alpha": st.floats(0, 1, exclude_min=True), "tau_base": UNIT,
         "gamma": st.floats(0, 5), "beta": st.integers(1, 5), "lambdas": st.lists(st.floats(0, 2), min_size=3,
                                                                                    max_size=3),
         "verify": st.sampled_from(list(VERIFY_RULES)), "signal": st.sampled_from(["ensemble", "entropy", "logit", "soft"]),
         "logit_scale": st.floats(0.1, 5), "confidence_stop": UNIT, "entropy_threshold": UNIT, "typical_eps": UNIT,
         "max_ngram": st.integers(1, 5), "skip_entropy": UNIT}
COMMON = {
    "model": mostly(st.just("tiny"), st.sampled_from(["gpt-4", ""]) | JSON),
    "max_tokens": mostly(st.integers(1, 6), st.integers(-2, 0) | st.integers(520, 2**70) | JSON),
    "temperature": mostly(st.floats(0, 2), st.floats(-2, 0, exclude_max=True) | JSON),
    "top_p": mostly(st.floats(0, 1, exclude_min=True)),
    "top_k": mostly(st.integers(0, 300)),
    "seed": mostly(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**70), 2**70) | JSON),
    "stop": mostly(st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stream": mostly(st.booleans()),
    "n": mostly(st.just(1), st.integers(-1, 3) | JSON),
    "ignore_eos": mostly(st.booleans()),
    "logprobs": mostly(st.none()),
    "speculation": mostly(st.fixed_dictionaries({}, optional={k: mostly(v) for k, v in KNOBS.items()})),
}
PROMPTS = mostly(st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 258), min_size=1, max_size=5),
                 st.lists(st.text(max_size=5), max_size=3) | st.lists(st.integers(-3, 300), max_size=5) | JSON)
MESSAGES = mostly(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                  "content": mostly(st.text(max_size=20))}), min_size=1, max_size=3),
                  st.lists(st.fixed_dictionaries({"role": st.text(max_size=8), "content": JSON}), max_size=2) | JSON)
REQUESTS = st.one_of(
    st.tuples(st.just("/v1/completions"), st.fixed_dictionaries({"prompt": PROMPTS}, optional=COMMON)),
    st.tuples(st.just("/v1/chat/completions"),
              st.fixed_dictionaries({"messages": MESSAGES}, optional={**COMMON, "max_completion_tokens": COMMON[
                  "max_tokens"]})))
BODIES = st.integers(0, 9).flatmap(lambda i: REQUESTS.map(lambda r: (r[0], json.dumps(r[1]).encode())) if i < 8
                                   else st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
                                                  JSON.map(json.dumps).map(str.encode) | st.binary(max_size=40)))


# A fixed set of 500 cases in the suite; ADASPEC_FUZZ_EXAMPLES=N runs N fresh random ones instead.
FUZZ_EXAMPLES = os.environ.get("ADASPEC_FUZZ_EXAMPLES")


@settings(max_examples=int(FUZZ_EXAMPLES or 500), derandomize=not FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=BODIES)
def test_fuzzed_bodies_never_get_a_5xx(server, request):
    path, body = request
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert_error(r, r.status_code)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(r.text.splitlines())
        assert events[-1] == "[DONE]" and "usage" in events[-2], r.text
    else:
        assert set(r.json()["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


# --- faults: cancellation, time limits, a full queue, shutdown --------------------------------------


# A slow generation: 32 draft tokens per step from a drafter that rarely agrees (~25 ms per token).
SLOW = {"max_tokens": 480, "ignore_eos": True, "speculation": {"method": "fixed", "k": 32}}


def test_client_disconnect_cancels_the_generation(server):
    def count(outcome):
        return server.metric("adaspec_generations_total", outcome=outcome)

    cancelled, finished = count("cancelled"), count("length")
    gone = server.metric("adaspec_requests_total", endpoint="/v1/completions", status="499")
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "a", **SLOW, "stream": True},
                      timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held: a dropped line iterator would close the connection early
        assert next(line for line in lines if line.startswith("data: "))
        t0 = time.perf_counter()  # the event loop answers while the worker generates
        assert httpx.get(server.url + "/health", timeout=5).json()["busy"] is True
        assert time.perf_counter() - t0 < 2.0
        # a request queued behind it whose client gives up is withdrawn from the queue
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={"prompt": "b", **SLOW}, timeout=0.3)
        wait_until(lambda: count("cancelled") == cancelled + 1)
        assert server.metric("adaspec_queue_depth") == 0 and server.metric("adaspec_busy") == 1
    # leaving the block dropped the streaming connection: the worker stops at its next step
    wait_until(lambda: count("cancelled") == cancelled + 2)
    assert count("length") == finished
    wait_until(lambda: server.metric("adaspec_busy") == 0)
    # the handler of the abandoned request counts its 499 when it returns, which can come after the worker idles
    wait_until(lambda: server.metric("adaspec_requests_total", endpoint="/v1/completions", status="499") == gone + 1)
    assert server.post("/v1/completions", {"prompt": "next", "max_tokens": 3}).status_code == 200


def test_a_non_streamed_request_whose_client_leaves_stops_within_a_step(server):
    def count(outcome):
        return server.metric("adaspec_generations_total", outcome=outcome)

    wait_until(lambda: server.metric("adaspec_busy") == 0)
    cancelled, finished = count("cancelled"), count("length")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the generation runs
        httpx.post(server.url + "/v1/completions", json={"prompt": "a", **SLOW}, timeout=0.5)
    t0 = time.perf_counter()
    wait_until(lambda: count("cancelled") == cancelled + 1, timeout=5)
    # SLOW takes about 12 s to finish, one of its steps up to about 0.4 s: it was stopped, not finished
    assert time.perf_counter() - t0 < 3.0
    assert count("length") == finished
    wait_until(lambda: server.metric("adaspec_busy") == 0)
    assert server.post("/v1/completions", {"prompt": "next", "max_tokens": 3}).status_code == 200


def test_time_limit_answers_504_and_stops_the_work(limited):
    timeouts = limited.metric("adaspec_generations_total", outcome="timeout")
    long = {"prompt": "never ending", **SLOW}
    t0 = time.perf_counter()
    err = assert_error(limited.post("/v1/completions", long), 504, type="timeout_error")
    assert err["code"] == "request_timeout" and time.perf_counter() - t0 < 4
    # The abandoned job stops at its next step; the stream starts on an idle worker, so that its first
    # tokens come well within the limit even on a slow machine (it waited behind the first job once).
    wait_until(lambda: limited.metric("adaspec_busy") == 0)
    # a stream that has begun reports the timeout as an error event before [DONE]
    with httpx.stream("POST", limited.url + "/v1/completions", json={**long, "stream": True},
                      headers=limited.headers, timeout=30) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout_error"
    assert any("choices" in e for e in events[:-2])
    wait_until(lambda: limited.metric("adaspec_generations_total", outcome="timeout") == timeouts + 2)
    wait_until(lambda: limited.metric("adaspec_busy") == 0)


def test_api_key(limited):
    for path in ("/v1/models", "/metrics"):
        assert_error(httpx.get(limited.url + path), 401, type="authentication_error")
        assert_error(httpx.get(limited.url + path, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(limited.url + path, headers=limited.headers).status_code == 200
    assert_error(httpx.post(limited.url + "/v1/completions", json={"prompt": "x"}), 401)
    assert_error(httpx.post(limited.url + "/v1/completions", json={"prompt": "x"},
                            headers={"Authorization": KEY}), 401)  # no "Bearer "
    assert httpx.get(limited.url + "/health").status_code == 200  # open, for load balancers
    with pytest.raises(openai.AuthenticationError):
        limited.client(api_key="wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    ok = limited.client(api_key=KEY).completions.create(model="tiny", prompt="x", max_tokens=2)
    assert ok.usage.completion_tokens == 2


LOAD = r"""
import asyncio, json, sys
import httpx

async def one(client, i):
    r = await client.post("/v1/completions", json={"prompt": f"request {i}", "max_tokens": 12, "ignore_eos": True})
    body = r.json()
    return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
            "usage": body.get("usage"), "speculation": body.get("speculation"), "error": body.get("error")}

async def main(url, n):
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        done = await asyncio.gather(*(one(client, i) for i in range(n)), return_exceptions=True)
    print(json.dumps([d if isinstance(d, dict) else {"status": None, "exception": repr(d)} for d in done]))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_load_from_another_process_loses_nothing():
    n = 50
    with LiveServer(queue_size=3, request_timeout=30) as s:
        before = s.metrics()
        proc = subprocess.run([sys.executable, "-c", LOAD, s.url, str(n)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout)
        after = s.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert len(results) == n
    ok = [r for r in results if r["status"] == 200]
    busy = [r for r in results if r["status"] == 429]
    assert len(ok) + len(busy) == n, [r for r in results if r["status"] not in (200, 429)]
    assert ok and busy  # 50 at once through a queue of 3: some wait, some are turned away
    assert all(int(r["retry_after"]) >= 1 and r["error"]["code"] == "queue_full" for r in busy)
    assert all(r["usage"]["completion_tokens"] == 12 for r in ok)
    assert delta("adaspec_requests_total", endpoint="/v1/completions", status="200") == len(ok)
    assert delta("adaspec_requests_total", endpoint="/v1/completions", status="429") == len(busy)
    assert delta("adaspec_generations_total", outcome="length") == len(ok)
    assert delta("adaspec_generated_tokens_total") == 12 * len(ok)
    assert delta("adaspec_prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in ok)
    assert delta("adaspec_drafted_tokens_total") == sum(r["speculation"]["drafted"] for r in ok)
    assert delta("adaspec_accepted_tokens_total") == sum(r["speculation"]["accepted"] for r in ok)
    assert delta("adaspec_mean_accepted_count") == len(ok)
    assert delta("adaspec_time_to_first_token_seconds_count") == len(ok)
    assert delta("adaspec_request_latency_seconds_count", endpoint="/v1/completions") == n
    assert after[("adaspec_queue_depth", ())] == 0 and after[("adaspec_queue_capacity", ())] == 3


def test_shutdown_finishes_open_requests_and_stops_the_worker():
    s = LiveServer(queue_size=4).__enter__()
    service = s.app.state.service
    body = {"prompt": "finish me", "max_tokens": 150, "ignore_eos": True, "stream": True}
    answers: list = []

    def stream():
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            answers.append(sse_events(r.iter_lines()))

    def plain():
        answers.append(httpx.post(s.url + "/v1/completions", json={"prompt": "queued", "max_tokens": 5}, timeout=30))

    clients = [threading.Thread(target=stream), threading.Thread(target=plain)]
    for c in clients:
        c.start()
        time.sleep(0.1)
    wait_until(lambda: service.worker.current is not None)
    s.__exit__(None, None, None)  # uvicorn lets both open requests finish, then the app stops its worker
    for c in clients:
        c.join(30)
    events = next(a for a in answers if isinstance(a, list))
    plain_answer = next(a for a in answers if isinstance(a, httpx.Response))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 150
    assert plain_answer.status_code == 200
    assert not s.thread.is_alive() and not service.worker._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)


def test_shutdown_answers_queued_requests_503():
    """What still waits when the app stops (uvicorn's graceful timeout ran out) is answered, not dropped."""
    from adaspec.server.app import Service
    from adaspec.server.schemas import APIError
    from adaspec.server.worker import Job

    async def scenario():
        service = Service(adaspec.load("tiny", "tiny-draft"), ServerSettings(queue_size=2))  # worker not started
        loop = asyncio.get_running_loop()
        jobs = [Job([1, 2], "cmasd", {"max_new_tokens": 2}, arrived=0, deadline=math.inf, loop=loop)
                for _ in range(2)]
        for job in jobs:
            service.worker.submit(job)
        service.shutdown()
        for job in jobs:
            with pytest.raises(APIError) as e:
                await service._next(job)
            assert e.value.status == 503 and e.value.code == "shutting_down"
        with pytest.raises(APIError):  # and nothing new is taken
            service.worker.submit(jobs[0])
        return service

    service = asyncio.run(scenario())
    assert service.metrics.generations.labels("shutdown")._value.get() == 2


def test_serve_command_end_to_end():
    """`adaspec serve` in its own process: flags and ADASPEC_API_KEY reach the app; Ctrl-C stops it cleanly."""

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ADASPEC_API_KEY": KEY}
    argv = ["serve", "--target", "tiny", "--drafter", "tiny-draft", "--threads", "1", "--port", str(port),
            "--queue-size", "5", "--max-new-tokens", "3", "--method", "ar", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-m", "adaspec.cli", *argv], env=env, stderr=subprocess.PIPE, text=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=30)
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, headers=auth, timeout=10).json()
        assert r["usage"]["completion_tokens"] == 3 and r["speculation"]["method"] == "ar"  # the flags' defaults
        assert "adaspec_queue_capacity 5.0" in httpx.get(url + "/metrics", headers=auth, timeout=5).text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_the_openapi_schema_says_what_the_server_does(server):
    schema = httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=10).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"200", "400", "429", "504"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
    parts = schema["components"]["schemas"]
    assert parts["Message"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    prompt = parts["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in prompt
    assert {"type": "array", "items": {"type": "integer"}, "minItems": 1} in prompt
    # and the server does what it says
    assert_error(server.post("/v1/completions", {"prompt": [], "max_tokens": 2}), 400, param="prompt")
    assert_error(server.post("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}), 400)


def test_serve_ray_without_ray_says_how_to_install_it(monkeypatch, capsys):
    from adaspec.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError, installed or not
    monkeypatch.delitem(sys.modules, "adaspec.server.ray_serve", raising=False)
    import adaspec.server  # an earlier import of ray_serve also left it as the package's attribute

    monkeypatch.delattr(adaspec.server, "ray_serve", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--ray", "--target", "tiny", "--drafter", "tiny-draft", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'adaspec: error: --ray needs Ray Serve: pip install -e ".[ray]"'
