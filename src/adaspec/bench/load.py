"""Load on an OpenAI-compatible server: `adaspec serve`, or llama.cpp's `llama-server` on the same
GGUF file, both spoken to the same way (`experiments/server_load.py` is the command).

Two kinds of run:
- **levels** (`level`): `clients` threads each send `requests` streamed chat completions one after
  another; aggregate throughput (completion tokens of all requests / wall time), mean per-client
  rate (a request's tokens / its latency), time to first token (p50, p95) and mean latency.
- **soak** (`soak`): `clients` threads send requests back to back for `seconds`, alternating
  streamed and non-streamed; every `cancel_every`-th request of a client is abandoned (a stream is
  closed after its first text, a non-streamed request stops waiting after `abandon_after_s`),
  staggered across clients (client c abandons its requests i with (c + i + 1) % cancel_every == 0),
  so that abandoned and completed requests run side by side from the first requests on, however
  long a request takes.
  Every request's fate is counted: completed, abandoned, 429 (retried after its Retry-After),
  5xx, other 4xx, and *lost* (no answer at all: a dropped connection, a stream that ended without
  [DONE], a 200 without usage, no answer within the time limit). Afterwards the server must fall
  idle (nothing running, nothing queued, where /health reports it): a cancelled request that
  kept its slot would show here.

Every request is greedy (`temperature: 0`, llama-server samples at 0.8 by default) and asks for
its usage at the end of a stream (`stream_options.include_usage`); a server that sends no usage
has its text chunks counted instead. Each prompt starts with its request's own number
("Request 12. ..."), so no two requests share more than the chat template's opening: a server
that caches prompt prefixes (llama-server does) gains only what a real mix of users would give it.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

PROMPTS = ("Write a Python function that checks whether a number is prime.",
           "Explain what a hash map is in two sentences.",
           "Write a SQL query that counts orders per customer.",
           "Translate to English: Der Hund schläft im Garten.")
OUTCOMES = ("completed", "abandoned", "busy", "server_error", "client_error", "lost")


@dataclass(frozen=True)
class Server:
    url: str
    model: str
    key: str | None = None

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    @classmethod
    def at(cls, url: str, key: str | None = None) -> "Server":
        """The server at `url`, with the id of the (first) model it serves."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return cls(url, httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"], key)


@dataclass
class Answer:
    outcome: str  # one of OUTCOMES
    status: int | None = None
    tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    retry_after: float | None = None
    why: str = ""  # what went wrong, for the lost and the errors


def request(server: Server, prompt: str, max_tokens: int, *, stream: bool = True, abandon: bool = False,
            abandon_after_s: float = 1.0, timeout_s: float = 300.0, extra: dict | None = None) -> Answer:
    """One chat completion; its Answer. With `abandon`, the client leaves: a stream after its first
    text, a non-streamed request after `abandon_after_s` seconds without an answer. `extra`: more
    fields of the request body (e.g. ``{"ignore_eos": True}``, which both servers honour)."""
    body = {"model": server.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **(extra or {})}
    if stream:
        body["stream_options"] = {"include_usage": True}
    read = abandon_after_s if abandon and not stream else timeout_s
    timeout = httpx.Timeout(timeout_s, read=read)
    t0 = time.perf_counter()
    try:
        if stream:
            return _stream(server, body, abandon, timeout, t0)
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=timeout)
        if r.status_code != 200:
            return _refused(r, t0)
        usage = r.json().get("usage")
        if not usage:
            return Answer("lost", 200, latency=time.perf_counter() - t0, why="a 200 without usage")
        latency = time.perf_counter() - t0
        return Answer("completed", 200, usage["completion_tokens"], latency, latency)
    except httpx.ReadTimeout as e:
        if abandon and not stream:
            return Answer("abandoned", latency=time.perf_counter() - t0)
        return Answer("lost", latency=time.perf_counter() - t0, why=f"no answer within {timeout_s:g} s: {e!r}")
    except httpx.HTTPError as e:
        return Answer("lost", latency=time.perf_counter() - t0, why=repr(e))


def _stream(server: Server, body: dict, abandon: bool, timeout: httpx.Timeout, t0: float) -> Answer:
    ttft, usage, chunks, done = None, None, 0, False
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers,
                      timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return _refused(r, t0)
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                status = chunk["error"].get("code") if isinstance(chunk["error"].get("code"), int) else None
                return Answer("server_error", status, latency=time.perf_counter() - t0,
                              why=f"an error event in the stream: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
                    if abandon:  # leaving the block closes the connection: the client is gone
                        return Answer("abandoned", 200, chunks, ttft, ttft)
            usage = chunk.get("usage") or usage
    latency = time.perf_counter() - t0
    if not done:
        return Answer("lost", 200, chunks, ttft, latency, why="the stream ended without [DONE]")
    return Answer("completed", 200, usage["completion_tokens"] if usage else chunks, ttft, latency)


def _refused(r: httpx.Response, t0: float) -> Answer:
    latency = time.perf_counter() - t0
    if r.status_code == 429:
        return Answer("busy", 429, latency=latency, retry_after=float(r.headers.get("Retry-After", 1)))
    kind = "server_error" if r.status_code >= 500 else "client_error"
    return Answer(kind, r.status_code, latency=latency, why=r.text[:300])


def _run_clients(client, clients: int) -> float:
    """Run client(0..clients-1) on threads of their own; the wall time until the last ends."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


_numbers = iter(range(1, 1 << 62))  # request numbers, unique within the process
_numbers_lock = threading.Lock()


def numbered(prompt: str) -> str:
    """The prompt behind a request number of its own (module docstring)."""
    with _numbers_lock:
        return f"Request {next(_numbers)}. {prompt}"


def level(server: Server, clients: int, requests: int, max_tokens: int, prompts=PROMPTS,
          extra: dict | None = None) -> dict:
    """`clients` threads, `requests` streamed requests each, one after another (module docstring)."""
    results: list[Answer] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(requests):
            a = request(server, numbered(prompts[(c + i) % len(prompts)]), max_tokens, extra=extra)
            with lock:
                results.append(a)

    wall = _run_clients(client, clients)
    failed = [a for a in results if a.outcome != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} requests failed, e.g. {failed[0]}")
    ttfts = [a.ttft for a in results if a.ttft is not None]
    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "throughput_tok_s": sum(a.tokens for a in results) / wall,
            "per_client_tok_s": statistics.mean(a.tokens / a.latency for a in results),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": _quantile(ttfts, 0.95),
            "latency_mean_s": statistics.mean(a.latency for a in results)}


@dataclass
class SoakReport:
    seconds: float  # wall time, the last requests' tails included
    clients: int
    outcomes: Counter = field(default_factory=Counter)
    tokens: int = 0  # completion tokens of the completed requests
    idle_after: bool | None = None  # nothing running or queued afterwards (None: /health does not say)
    problems: list[str] = field(default_factory=list)  # why each lost / 5xx / 4xx request failed

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ok(self) -> bool:
        """No request lost, none answered 5xx or an unexpected 4xx, and the server idle afterwards."""
        return not (self.outcomes["lost"] or self.outcomes["server_error"] or self.outcomes["client_error"]) \
            and self.idle_after is not False


def soak(server: Server, clients: int, seconds: float, max_tokens: int, *, cancel_every: int = 4,
         abandon_after_s: float = 1.0, timeout_s: float = 300.0, prompts=PROMPTS,
         extra: dict | None = None) -> SoakReport:
    """A bounded load run with cancellations (module docstring): no request starts after `seconds`;
    the ones running then are waited for (at most `timeout_s`)."""
    report, lock = SoakReport(0.0, clients), threading.Lock()
    deadline = time.monotonic() + seconds

    def client(c: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            a = request(server, numbered(prompts[(c + i) % len(prompts)]), max_tokens, stream=(c + i) % 2 == 0,
                        abandon=cancel_every > 0 and (c + i + 1) % cancel_every == 0,
                        abandon_after_s=abandon_after_s, timeout_s=timeout_s, extra=extra)
            i += 1
            with lock:
                report.outcomes[a.outcome] += 1
                report.tokens += a.tokens if a.outcome == "completed" else 0
                if a.why:
                    report.problems.append(f"{a.outcome} {a.status}: {a.why}")
            if a.outcome == "busy":
                time.sleep(min(a.retry_after or 1.0, max(0.0, deadline - time.monotonic())))

    report.seconds = _run_clients(client, clients)
    report.idle_after = wait_idle(server)
    return report


def wait_idle(server: Server, within_s: float = 30.0) -> bool | None:
    """Whether the server reports nothing running and nothing queued within `within_s` (None when its
    /health does not say)."""
    end = time.monotonic() + within_s
    while True:
        health = httpx.get(f"{server.url}/health", headers=server.headers, timeout=10).json()
        if "running" not in health or "queue_depth" not in health:
            return None
        if health["running"] == 0 and health["queue_depth"] == 0:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
