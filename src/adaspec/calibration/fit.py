"""Calibration: log what the target does with every judged draft token, fit a profile from it.

collect -> fit -> profile:
1. `collect` runs the pair with a generous fixed draft (k = k_max, exact verification, greedy) and
   logs, for every *judged* draft token, its signals (normalised entropy, c_ent, c_logit, c_soft),
   its position in the draft and whether it was accepted. Acceptance stops at the first rejection,
   so only the accepted prefix and the first rejected token are judged; later tokens are censored
   (never seen by the target's rule) and not logged. Each logged token is therefore a sample of
   P(accept d_i | d_1..d_{i-1} accepted, signals of d_i), the very conditional the cost-aware
   policy chains (P_i = P_{i-1} * a_i). Per step it also keeps the first token's entropy and the
   accepted length n, which under greedy verification is exact for every shorter draft too.
2. `fit_acceptance` fits a logistic regression of accepted on (c_ent, c_logit, c_soft) with
   non-negative weights (more confidence never predicts less acceptance); lambdas = w / sum(w).
3. `youden_threshold` picks the normalised entropy that best separates rejected from accepted
   tokens (Youden's J = TPR - FPR for "entropy > t predicts rejection"): the regime threshold.
4. `fit_skip_entropy` finds, per bin of first-token entropy, the best expected goodput of drafting
   under the measured cost model, and the entropy above which no draft beats plain decoding.
5. `goodness` reports log-loss, AUC, Brier score, base rate and a binned calibration curve on the
   fit prompts, on held-out prompts and on a held-out subtask (transfer).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaspec.calibration.cost import CostModel, measure
from adaspec.calibration.identity import model_identity
from adaspec.calibration.profile import AcceptanceModel, Profile
from adaspec.config import AdaspecError
from adaspec.policies.cost import cost_table, goodput

FEATURES = ("c_ent", "c_logit", "c_soft")


@dataclass
class CalibrationLog:
    """Judged draft tokens (N,) and speculative steps (S,) of a calibration run."""

    prompt_ids: list[str]  # record id per prompt index
    c_ent: torch.Tensor  # (N,) float64
    c_logit: torch.Tensor  # (N,)
    c_soft: torch.Tensor  # (N,)
    entropy: torch.Tensor  # (N,) normalised entropy H / log V
    position: torch.Tensor  # (N,) int64, 0-based index in its draft
    accepted: torch.Tensor  # (N,) bool
    token_prompt: torch.Tensor  # (N,) int64 prompt index
    step_entropy: torch.Tensor  # (S,) normalised entropy of the step's first draft token
    step_accepted: torch.Tensor  # (S,) int64 accepted length n
    step_k: torch.Tensor  # (S,) int64 draft length
    step_prompt: torch.Tensor  # (S,) int64 prompt index
    policy_s: float = 0.0  # summed Stats.policy_s of the runs (signals, policy, bookkeeping)
    total_s: float = 0.0  # summed Stats.total_s
    decode_s: float = 0.0  # summed total_s - prefill_s

    def features(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.stack([self.c_ent, self.c_logit, self.c_soft], dim=1)  # (N, 3)
        return x if mask is None else x[mask]

    def token_mask(self, ids: Sequence[str]) -> torch.Tensor:
        return _in(self.token_prompt, self.prompt_ids, ids)

    def step_mask(self, ids: Sequence[str]) -> torch.Tensor:
        return _in(self.step_prompt, self.prompt_ids, ids)


def _in(index: torch.Tensor, names: list[str], wanted: Sequence[str]) -> torch.Tensor:
    keep = torch.tensor([n in set(wanted) for n in names] or [False], dtype=torch.bool)
    return keep[index] if index.numel() else torch.zeros(0, dtype=torch.bool)


def collect(engine, prompts: Sequence[tuple[str, str | list[int]]], *, k: int = 8, max_new_tokens: int = 64,
            log: Callable[[str], None] | None = None) -> CalibrationLog:
    """Generate every (id, prompt) with `fixed` k, greedy and traced; log judged tokens and steps."""
    if engine.drafter is None:
        raise AdaspecError("calibration needs a drafter model: pass --drafter")
    tok: dict[str, list] = {f: [] for f in (*FEATURES, "entropy", "position", "accepted", "prompt")}
    step: dict[str, list] = {f: [] for f in ("entropy", "accepted", "k", "prompt")}
    sums = [0.0, 0.0, 0.0]
    limit = engine.target.max_length
    for p, (rid, prompt) in enumerate(prompts):
        ids = engine.encode(prompt)
        if limit is not None and len(ids) + max_new_tokens > limit:
            ids = ids[-(limit - max_new_tokens):]  # keep the end: a toy model's context is short
        r = engine.generate(ids, method="fixed", k=k, k_max=max(k, 8), max_new_tokens=max_new_tokens,
                            temperature=0.0, trace=True)
        for t in r.trace:
            if t.k == 0:
                continue
            n = sum(t.accepted)
            judged = min(n + 1, t.k)  # accepted prefix + first rejection; the rest is censored
            for i in range(judged):
                for f in FEATURES + ("entropy",):
                    tok[f].append(getattr(t, f)[i])
                tok["position"].append(i)
                tok["accepted"].append(i < n)
                tok["prompt"].append(p)
            for f, v in (("entropy", t.entropy[0]), ("accepted", n), ("k", t.k), ("prompt", p)):
                step[f].append(v)
        s = r.stats
        sums[0] += s.policy_s
        sums[1] += s.total_s
        sums[2] += s.total_s - s.prefill_s
        if log:
            log(f"[{p + 1}/{len(prompts)}] {rid}: {s.new_tokens} tokens, acceptance {s.acceptance_rate:.1%}, "
                f"{s.total_s:.1f}s")
    f64, i64 = torch.float64, torch.long
    return CalibrationLog(
        prompt_ids=[rid for rid, _ in prompts],
        **{f: torch.tensor(tok[f], dtype=f64) for f in (*FEATURES, "entropy")},
        position=torch.tensor(tok["position"], dtype=i64), accepted=torch.tensor(tok["accepted"], dtype=torch.bool),
        token_prompt=torch.tensor(tok["prompt"], dtype=i64),
        step_entropy=torch.tensor(step["entropy"], dtype=f64), step_accepted=torch.tensor(step["accepted"], dtype=i64),
        step_k=torch.tensor(step["k"], dtype=i64), step_prompt=torch.tensor(step["prompt"], dtype=i64),
        policy_s=sums[0], total_s=sums[1], decode_s=sums[2])


# ---- fitting -------------------------------------------------------------------------------------

def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-4) -> tuple[float, list[float]]:
    """Logistic regression y ~ sigmoid(b + x w) by L-BFGS on the mean log-loss (+ a tiny ridge so
    that separable data still has a finite optimum). x (N, d), y (N,) in {0, 1} -> (b, w)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    theta = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = theta[0] + x @ theta[1:]  # (N,)
        loss = F.binary_cross_entropy_with_logits(z, y) + l2 * theta[1:].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    theta = theta.detach()
    return float(theta[0]), theta[1:].tolist()


def fit_acceptance(x: torch.Tensor, y: torch.Tensor) -> AcceptanceModel:
    """Non-negative logistic regression by active set: fit, drop the most negative weight, refit."""
    if y.numel() == 0 or bool(y.all()) or not bool(y.any()):
        rate = float(y.double().mean()) if y.numel() else 0.5
        rate = min(max(rate, 1e-3), 1 - 1e-3)
        return AcceptanceModel(math.log(rate / (1 - rate)), (0.0, 0.0, 0.0))  # nothing to separate
    active = list(range(x.shape[1]))
    while True:
        b, w = fit_logistic(x[:, active], y) if active else (_logit_rate(y), [])
        if not active or min(w) >= 0:
            break
        active.pop(w.index(min(w)))
    weights = [0.0] * x.shape[1]
    for j, v in zip(active, w):
        weights[j] = v
    return AcceptanceModel(b, tuple(weights))


def _logit_rate(y: torch.Tensor) -> float:
    rate = float(y.double().mean())
    return math.log(rate / (1 - rate))


def lambdas_from(model: AcceptanceModel) -> tuple[float, float, float]:
    """Acceptance weights normalised to sum 1; equal weights when no signal predicts acceptance."""
    total = sum(model.weights)
    return tuple(w / total for w in model.weights) if total > 0 else (1 / 3, 1 / 3, 1 / 3)


def youden_threshold(entropy: torch.Tensor, rejected: torch.Tensor) -> dict | None:
    """The t maximising J = P(h > t | rejected) - P(h > t | accepted); None with one class only.

    Returns threshold (midway between the two observed entropies it separates), j, tpr, fpr."""
    rejected = rejected.bool()
    n_pos, n_neg = int(rejected.sum()), int((~rejected).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    values = torch.unique(entropy)  # sorted ascending
    # tokens with h > values[m] for each candidate m: counts from the right
    above_pos = (entropy[rejected][None, :] > values[:, None]).sum(1).double() / n_pos  # (U,)
    above_neg = (entropy[~rejected][None, :] > values[:, None]).sum(1).double() / n_neg  # (U,)
    j = above_pos - above_neg
    m = int(j.argmax())
    upper = values[m + 1] if m + 1 < values.numel() else values[m]
    return {"threshold": float((values[m] + upper) / 2), "j": float(j[m]), "tpr": float(above_pos[m]),
            "fpr": float(above_neg[m])}


def fit_skip_entropy(first_entropy: torch.Tensor, n_accepted: torch.Tensor, k: torch.Tensor, cost: CostModel,
                     *, bins: int = 8, min_steps: int = 20) -> tuple[float, list[dict]]:
    """The first-token entropy above which drafting with the model drafter stops paying.

    Per quantile bin of first-token entropy: for every draft length j up to the logged k, the
    expected goodput (1 + E[min(n, j)]) / (j * D + T(j + 1)) (min(n, j) is exact: a shorter greedy
    draft is accepted exactly as far), its best j, and whether it beats plain decoding, 1 / T(1).
    skip_entropy is the lower edge of the highest run of bins where no draft pays (1.0 = never).
    """
    s = first_entropy.numel()
    if s == 0:
        return 1.0, []
    d = cost.drafter_ms_per_token or 0.0
    t = cost_table(cost.target_cost, int(k.max()) + 1)  # t[n] = T(n)
    ar = 1.0 / t[1]
    nb = max(1, min(bins, s // min_steps))
    edges = torch.quantile(first_entropy, torch.linspace(0, 1, nb + 1, dtype=torch.float64)).tolist()
    table = []
    for b in range(nb):
        lo, hi = edges[b], edges[b + 1]
        m = (first_entropy >= lo) & ((first_entropy < hi) if b < nb - 1 else (first_entropy <= hi))
        if not bool(m.any()):
            continue
        k_max = int(k[m].min())
        rates = [goodput(1 + float(n_accepted[m].clamp(max=j).double().mean()), j, d, t[j + 1])
                 for j in range(1, k_max + 1)]
        best = max(range(k_max), key=rates.__getitem__)
        table.append({"lo": lo, "hi": hi, "steps": int(m.sum()), "mean_accepted": float(n_accepted[m].double().mean()),
                      "best_k": best + 1, "goodput": rates[best], "ar_goodput": ar, "pays": rates[best] > ar})
    skip = 1.0
    for row in reversed(table):
        if row["pays"]:
            break
        skip = row["lo"]
    return float(min(max(skip, 0.0), 1.0)), table


# ---- goodness of fit -----------------------------------------------------------------------------

def auc(score: torch.Tensor, y: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None with one class only."""
    y = y.bool()
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    order = torch.argsort(score)
    ranks = torch.empty(score.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(1, score.numel() + 1, dtype=torch.float64)
    _, inv, counts = torch.unique(score, return_inverse=True, return_counts=True)
    ranks = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inv, ranks)[inv] / counts[inv]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def goodness(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> dict:
    """log-loss, AUC, Brier score, base rate, sample count and a reliability table of predictions p."""
    y = y.to(torch.float64)
    n = int(y.numel())
    if n == 0:
        return {"n": 0}
    p = p.to(torch.float64).clamp(1e-12, 1 - 1e-12)
    table = []
    which = (p * bins).long().clamp(max=bins - 1)
    for b in range(bins):
        m = which == b
        if bool(m.any()):
            table.append({"lo": b / bins, "hi": (b + 1) / bins, "n": int(m.sum()),
                          "predicted": float(p[m].mean()), "observed": float(y[m].mean())})
    return {"n": n, "base_rate": float(y.mean()),
            "log_loss": float(-(y * p.log() + (1 - y) * (1 - p).log()).mean()),
            "auc": auc(p, y), "brier": float((p - y).pow(2).mean()),
            "ece": sum(r["n"] * abs(r["predicted"] - r["observed"]) for r in table) / n,
            "calibration": table}


# ---- the whole calibration -----------------------------------------------------------------------

def assign_roles(records, held_out: float = 0.25, transfer_subtask: str | None = None, seed: int = 0
                 ) -> dict[str, list[str]]:
    """Record ids for fitting, for held-out figures (a seeded hash sample of the rest) and for
    transfer figures (every record of `transfer_subtask`, kept out of the fit)."""
    if not 0 <= held_out < 1:
        raise AdaspecError(f"held_out must be in [0, 1), got {held_out!r}")
    subtasks = {r.subtask for r in records}
    if transfer_subtask is not None and transfer_subtask not in subtasks:
        raise AdaspecError(f"transfer subtask {transfer_subtask!r} is not among the calibration prompts' "
                           f"subtasks: {', '.join(sorted(subtasks))}")
    transfer = [r.id for r in records if r.subtask == transfer_subtask]
    rest = sorted((r.id for r in records if r.subtask != transfer_subtask),
                  key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_held = min(len(rest) - 1, max(1 if held_out > 0 and len(rest) > 1 else 0, round(held_out * len(rest))))
    held = set(rest[:n_held])
    if not rest or len(rest) == n_held:
        raise AdaspecError("no prompts left to fit on: give more calibration prompts (--limit) or no transfer subtask")
    order = [r.id for r in records]
    return {"fit": [i for i in order if i in set(rest) - held], "held_out": [i for i in order if i in held],
            "transfer": transfer}


def calibrate(engine, records, *, max_new_tokens: int = 64, k_max: int = 8, held_out: float = 0.25,
              transfer_subtask: str | None = None, prompt_text: Callable = lambda r: r.prompt,
              cost: CostModel | None = None, cost_repeats: int = 5, cost_prompt_len: int = 200,
              data: dict | None = None, log: Callable[[str], None] = print) -> tuple[Profile, CalibrationLog]:
    """Run, fit and measure; returns the profile and the raw log. `data` is merged into profile.data."""
    roles = assign_roles(records, held_out, transfer_subtask)
    t0 = time.perf_counter()
    clog = collect(engine, [(r.id, prompt_text(r)) for r in records], k=k_max, max_new_tokens=max_new_tokens, log=log)
    fit_mask = clog.token_mask(roles["fit"])
    if int(fit_mask.sum()) < 10:
        raise AdaspecError(f"only {int(fit_mask.sum())} judged draft tokens to fit on: give more prompts (--limit) "
                           "or more tokens (--max-new-tokens)")
    model = fit_acceptance(clog.features(fit_mask), clog.accepted[fit_mask])
    fit = {}
    for role, ids in roles.items():
        m = clog.token_mask(ids)
        x = clog.features(m)
        fit[role] = goodness(model.prob(x[:, 0], x[:, 1], x[:, 2]), clog.accepted[m]) if ids else {"n": 0}
    youden = youden_threshold(clog.entropy[fit_mask], ~clog.accepted[fit_mask])
    if cost is None:
        log("measuring the cost model ...")
        cost = measure(engine.target, engine.drafter, prompt_len=cost_prompt_len, repeats=cost_repeats)
    steps = clog.step_mask(roles["fit"])
    skip, skip_table = fit_skip_entropy(clog.step_entropy[steps], clog.step_accepted[steps], clog.step_k[steps], cost)
    positions = [{"position": i, "n": int((m := fit_mask & (clog.position == i)).sum()),
                  "acceptance": float(clog.accepted[m].double().mean()) if bool(m.any()) else None}
                 for i in range(k_max)]
    details = {
        "youden": youden, "skip_table": skip_table, "position_acceptance": positions,
        "overhead": {"policy_s": clog.policy_s, "total_s": clog.total_s,
                     "share_of_total": clog.policy_s / clog.total_s if clog.total_s else None,
                     "share_of_decode": clog.policy_s / clog.decode_s if clog.decode_s else None},
        "tau": "not fitted: the relaxed-acceptance bound tau_base trades quality for speed, and exact-match "
               "acceptance data cannot price quality; it stays a user choice (entropy-tau uses the fitted "
               "entropy_threshold as its regime boundary)",
        "calibration_s": time.perf_counter() - t0,
    }
    drafter_name = engine.drafter_name
    info = {"method": "fixed", "k": k_max, "max_new_tokens": max_new_tokens, "temperature": 0.0,
            "verify": "exact", "chat": engine.chat, "ids": roles, "judged_tokens": int(clog.accepted.numel()),
            "steps": int(clog.step_k.numel()),
            "censoring": "only judged draft tokens are logged: the accepted prefix and the first rejected "
                         "token of each draft; later tokens were never judged by the target",
            **(data or {})}
    profile = Profile(
        target=model_identity(engine.target, engine.target_name),
        drafter=model_identity(engine.drafter, drafter_name),
        acceptance=model, lambdas=lambdas_from(model),
        entropy_threshold=min(max(youden["threshold"], 0.0), 1.0) if youden else 0.3, skip_entropy=skip, cost=cost,
        fit=fit, details=details, data=info)
    return profile, clog
