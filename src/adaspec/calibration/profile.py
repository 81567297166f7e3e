"""A calibration profile: what `adaspec calibrate` fitted for one target/drafter pair, as JSON.

A profile holds
- the identity of both models (name, vocabulary size, the pinned sha256 of registry presets, a
  fingerprint of the weights), so that a profile made for another pair is refused;
- the acceptance model a = sigmoid(b + w . (c_ent, c_logit, c_soft)), w >= 0: the probability that
  the target accepts a draft token given that every earlier token of its draft was accepted;
- the knobs it implies: lambdas = w / sum(w), the entropy threshold of the "reasoning" regime,
  the drafter pool's skip_entropy;
- the measured cost model (calibration.cost.CostModel) of the pair on the calibration machine;
- goodness-of-fit figures on the calibration, held-out and transfer prompts, and what data and
  settings produced them. docs/calibration.md explains every field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adaspec.calibration.cost import CostModel
from adaspec.calibration.identity import identity_mismatch
from adaspec.config import AdaspecError
from adaspec.policies.cost import best_draft_length

PROFILE_VERSION = 1
SIGNAL_NAMES = ("c_ent", "c_logit", "c_soft")  # order of AcceptanceModel.weights and of lambdas


@dataclass
class AcceptanceModel:
    """P(accept d_i | d_1..d_{i-1} accepted, signals of d_i) = sigmoid(intercept + weights . c)."""

    intercept: float
    weights: tuple[float, float, float]  # on (c_ent, c_logit, c_soft); non-negative

    def logit(self, c_ent, c_logit, c_soft):
        """Floats or same-shaped tensors (...) -> the log-odds of acceptance (...)."""
        w = self.weights
        return self.intercept + w[0] * c_ent + w[1] * c_logit + w[2] * c_soft

    def prob(self, c_ent, c_logit, c_soft):
        z = self.logit(c_ent, c_logit, c_soft)
        return torch.sigmoid(z) if isinstance(z, torch.Tensor) else 1.0 / (1.0 + math.exp(-z))


@dataclass
class Profile:
    target: dict  # model_identity() of the target
    drafter: dict  # model_identity() of the drafter
    acceptance: AcceptanceModel
    lambdas: tuple[float, float, float]  # acceptance weights normalised to sum 1
    entropy_threshold: float  # normalised entropy separating routine from "reasoning" (Youden's J)
    skip_entropy: float  # pool: no model drafter above this first-token entropy EMA (1.0 = never skip)
    cost: CostModel  # measured target ms per new-token count, drafter ms per token
    fit: dict = field(default_factory=dict)  # split name -> goodness-of-fit figures (calibrate.goodness)
    details: dict = field(default_factory=dict)  # Youden curve point, skip table, per-position rates, overhead
    data: dict = field(default_factory=dict)  # suite, split, prompt ids per role, generation settings
    version: int = PROFILE_VERSION

    def knobs(self) -> dict:
        """The SpecConfig knobs this profile calibrates (plan.resolve_knobs gives them to the
        calibrated methods wherever a request leaves them unset)."""
        knobs = {"lambdas": tuple(self.lambdas), "entropy_threshold": self.entropy_threshold,
                 "skip_entropy": self.skip_entropy}
        k_max = self.cost_k_max()
        if k_max is not None:
            knobs["k_max"] = k_max
        return knobs

    def cost_k_max(self, limit: int = 16) -> int | None:
        """The longest draft worth its cost on this machine: the draft length of highest expected
        goodput when every token is as likely to be accepted as a fully confident one (C = 1, the
        acceptance model's most optimistic case). No adaptive policy should draft further, since
        no token is more likely to be accepted than that. None without a drafter cost."""
        drafter_ms = self.cost.drafter_ms_per_token
        if drafter_ms is None or not self.cost.target_ms:
            return None
        accept = float(self.acceptance.prob(1.0, 1.0, 1.0))
        return best_draft_length(accept, drafter_ms, self.cost.target_cost, limit)

    def to_json(self) -> str:
        d = asdict(self)
        d["cost"] = self.cost.to_dict()
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "profile") -> "Profile":
        try:
            d = json.loads(text)
            if d.get("version") != PROFILE_VERSION:
                raise AdaspecError(f"{source} is a version {d.get('version')!r} profile; this adaspec reads version "
                                   f"{PROFILE_VERSION}: run `adaspec calibrate` again")
            cost = CostModel.from_dict(d["cost"])
            a = d["acceptance"]
            return cls(target=d["target"], drafter=d["drafter"],
                       acceptance=AcceptanceModel(float(a["intercept"]), tuple(map(float, a["weights"]))),
                       lambdas=tuple(map(float, d["lambdas"])), entropy_threshold=float(d["entropy_threshold"]),
                       skip_entropy=float(d["skip_entropy"]), cost=cost, fit=d.get("fit", {}),
                       details=d.get("details", {}), data=d.get("data", {}), version=d["version"])
        except AdaspecError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise AdaspecError(f"{source} is not an adaspec calibration profile ({type(e).__name__}: {e}); "
                               "make one with `adaspec calibrate`") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise AdaspecError(f"cannot read the profile {path}: {e.strerror or e}") from e
        return cls.from_json(text, source=str(path))

    def check_pair(self, target: dict, drafter: dict | None) -> None:
        """Refuse (AdaspecError) to use this profile with models other than the ones it was made for."""
        if drafter is None:
            raise AdaspecError("a calibration profile needs a drafter model: load the drafter it was made for "
                               f"({self.drafter.get('name')})")
        for role, mine, theirs in (("target", self.target, target), ("drafter", self.drafter, drafter)):
            why = identity_mismatch(mine, theirs)
            if why:
                raise AdaspecError(
                    f"this profile was calibrated for target {self.target.get('name')!r} with drafter "
                    f"{self.drafter.get('name')!r}, but the {role} here is {theirs.get('name')!r} ({why}); run "
                    f"`adaspec calibrate --target {target.get('name')} --drafter {drafter.get('name')}` for this "
                    "pair, or load the pair the profile was made for")


def load_profile(profile: "Profile | str | Path | None") -> Profile | None:
    return Profile.load(profile) if isinstance(profile, (str, Path)) else profile
