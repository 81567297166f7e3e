"""The measured cost model: what one target forward costs as a function of how many tokens it adds.

Speculative decoding pays one target forward over k+1 positions per step instead of one forward
per token. Whether a longer draft pays off depends on how that forward's time grows with the
number of new tokens n, which differs between machines and precisions (docs/results hold the
measured curves). `forward_cost` measures it on the machine at hand; `CostModel.target_cost(n)` is
what the cost-aware policies and the drafter pool read.

The measurement uses whatever thread count torch is set to (it never changes it) and records it.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adaspec.calibration.identity import device_name
from adaspec.config import AdaspecError
from adaspec.models.base import ModelAdapter


@dataclass
class CostModel:
    target_ms: dict[int, float]  # new tokens n in one forward -> median ms, after a prompt
    drafter_ms_per_token: float | None  # one drafter forward of one token, None without a drafter
    machine: str  # CPU or GPU model name the figures were taken on
    threads: int  # torch intra-op threads during the measurement

    def __post_init__(self):
        self.target_ms = {int(n): float(ms) for n, ms in sorted(self.target_ms.items())}
        if 1 not in self.target_ms:
            raise AdaspecError("a cost model needs target_ms[1], the cost of a one-token forward")
        if any(n < 1 or ms <= 0 for n, ms in self.target_ms.items()):
            raise AdaspecError(f"target_ms needs token counts >= 1 and positive times, got {self.target_ms}")

    def target_cost(self, n: float) -> float:
        """ms of a target forward over n new tokens: piecewise linear through the measured points,
        extended past the last one along the line through the last two."""
        if n < 1:
            raise AdaspecError(f"a forward adds at least one token, got n={n}")
        points = sorted(self.target_ms.items())
        if len(points) == 1:
            return points[0][1]
        for (n0, t0), (n1, t1) in zip(points, points[1:]):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = points[-2:]
        return max(t1, t1 + (t1 - t0) * (n - n1) / (n1 - n0))  # never cheaper than the last point

    def to_dict(self) -> dict:
        return {"target_ms": {str(n): ms for n, ms in self.target_ms.items()},  # JSON keys are strings
                "drafter_ms_per_token": self.drafter_ms_per_token, "machine": self.machine, "threads": self.threads}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        return cls(target_ms={int(n): ms for n, ms in d["target_ms"].items()},
                   drafter_ms_per_token=d.get("drafter_ms_per_token"), machine=d.get("machine", ""),
                   threads=int(d.get("threads", 0)))


def forward_cost(adapter: ModelAdapter, prompt_len: int = 200, new_tokens=(1, 2, 4, 8, 16),
                 repeats: int = 5, *, seed: int = 0) -> dict[int, float]:
    """Median ms of one `extend` over n new tokens after a prompt of `prompt_len`, for each n.

    The prompt is seeded random token ids (a forward's time does not depend on which ids). Each
    timed forward is rolled back to the prompt, so all see the same context; one untimed forward
    per n warms up kernels and allocator first. The adapter's cache is emptied at the end.
    """
    if repeats < 1 or prompt_len < 1 or not new_tokens or min(new_tokens) < 1:
        raise AdaspecError("forward_cost needs prompt_len >= 1, repeats >= 1 and token counts >= 1")
    need = prompt_len + max(new_tokens)
    if adapter.max_length is not None and need > adapter.max_length:
        raise AdaspecError(f"{adapter.name}: prompt_len + max(new_tokens) = {need} exceeds its context "
                           f"of {adapter.max_length}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, adapter.vocab_size, (need,), generator=g)
    adapter.reset()
    adapter.extend(ids[:prompt_len])
    out: dict[int, float] = {}
    for n in new_tokens:
        new = ids[prompt_len:prompt_len + n]
        times = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            adapter.extend(new)[-1, 0].item()  # deliberate sync: the time must include the forward
            if r:  # r == 0 is the warm-up
                times.append((time.perf_counter() - t0) * 1e3)
            adapter.rollback(prompt_len)
        out[int(n)] = statistics.median(times)
    adapter.reset()
    return out


def fitting_prompt_len(adapter: ModelAdapter, prompt_len: int, new_tokens=(1, 2, 4, 8, 16)) -> int:
    """prompt_len, shortened where the model's context cannot hold it plus the longest forward."""
    limit = adapter.max_length
    return prompt_len if limit is None else max(1, min(prompt_len, limit - max(new_tokens)))


def measure(target: ModelAdapter, drafter: ModelAdapter | None = None, *, prompt_len: int = 200,
            new_tokens=(1, 2, 4, 8, 16), repeats: int = 5) -> CostModel:
    """A CostModel for this target (and drafter) on this machine, at torch's current thread count,
    after a prompt of prompt_len (shortened to fit a short context, `fitting_prompt_len`)."""
    new_tokens = tuple(new_tokens)
    prompt_len = fitting_prompt_len(target, prompt_len, new_tokens)
    target_ms = forward_cost(target, prompt_len, new_tokens, repeats)
    drafter_ms = forward_cost(drafter, prompt_len, (1,), repeats)[1] if drafter is not None else None
    return CostModel(target_ms, drafter_ms, device_name(target.device), torch.get_num_threads())


def cost_here(cost: CostModel, target: ModelAdapter, drafter: ModelAdapter | None, *, cache: Path,
              identity: str) -> CostModel:
    """The cost model to price drafts with on this machine. A profile's own is used where it was
    measured: the same CPU (or GPU) and the same torch thread count. Anywhere else the pair is
    measured here once, a few seconds, and cached under `cache` per machine, thread count and pair
    (`identity`, e.g. the models' weight fingerprints): another machine's costs would price drafts
    with the wrong numbers."""
    machine, threads = device_name(target.device), torch.get_num_threads()
    if cost.machine == machine and cost.threads == threads:
        return cost
    key = hashlib.sha256(f"{machine}|{threads}|{identity}".encode()).hexdigest()[:16]
    path = Path(cache) / f"cost-{key}.json"
    if path.is_file():
        try:
            return CostModel.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AdaspecError):
            pass  # damaged: measure again
    here = measure(target, drafter)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(here.to_dict(), indent=1) + "\n")
    except OSError:  # a read-only cache: measured again next time
        pass
    return here
