"""A draft head on the target's own features: one decoder layer that drafts from the target's last
hidden state (EAGLE-style), over a pruned drafting vocabulary.

What it computes. Entry j of the head reads the target's final hidden state f_j at position j (the
input of the target's output head) and the embedding of token j+1, and predicts g_j ~ f_{j+1}:

    x_j = fc([norm_e(embed(x_{j+1})), norm_f(f_j)])            (2H -> H)
    h_j = one pre-norm decoder layer over x_0..x_j (causal attention with rotary positions j, SwiGLU)
    g_j = norm_out(h_j);   logits_j = W_N g_j                   (the target's head rows of the N kept ids)

logits_j is the head's guess at the target's distribution of token j+2. Drafting k tokens after a
committed sequence of length L: the entries up to L-2 read real target features (the target's cache
holds L-1 positions, decode.py's invariant), the last one gives draft d_1; then the head feeds its own
g as the next feature with the embedding of d_1, and so on: one small layer and an N-row head per
drafted token, instead of a whole drafter model. The embedding and the head rows are the target's
own (shared, frozen, not stored with the head), so a head file holds only its layer (tens of MB).

Cache: the head keeps a key/value cache of its entries by position. Entries drafted from its own
features are forgotten at commit; the next proposal recomputes them from the target's real features
of the accepted tokens (usually n_accepted + 1 entries in one forward).

The head is a drafter like the others: its distribution (over the kept ids, zero elsewhere)
drives the same signals, length policies and verification; verification is the target's, over
the full vocabulary, so greedy output equals plain decoding and rejection sampling stays exact.

Training: training/head.py (`adaspec train-head`), docs/method.md ("Draft head").
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from adaspec.config import AdaspecError
from adaspec.drafters.base import DraftBuilder, DraftContext
from adaspec.drafters.vocab import DraftVocab
from adaspec.models.features import embedding_dtype, embedding_values, input_embedding, output_rows, tap
from adaspec.models.light import RMSNorm
from adaspec.models.registry import file_sha256
from adaspec.records import Draft

FORMAT = 1  # version of the head file layout


@dataclass(frozen=True)
class HeadConfig:
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @classmethod
    def for_target(cls, model: nn.Module, intermediate: int | None = None) -> "HeadConfig":
        """The head's shape for a target: its hidden size and attention layout, its rotary base; the
        MLP width defaults to the hidden size times 4/3 (smaller than the target's: it trains faster
        per second on a CPU and keeps the file small)."""
        config = getattr(model, "config", None) or getattr(model, "cfg", None)  # transformers, or the toy models
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if hidden is None:
            raise AdaspecError(f"{type(model).__name__}: cannot read the target's hidden size for a draft head")
        n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or hidden // n_heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        eps = float(getattr(config, "rms_norm_eps", 1e-6))
        width = intermediate or _round_up(hidden * 4 // 3, 64)
        return cls(int(hidden), int(n_heads), int(n_kv), int(head_dim), int(width), theta, eps)


class HeadCache:
    """Keys and values of the head's entries (n_kv, capacity, head_dim); rollback moves `length`."""

    def __init__(self):
        self.k = self.v = torch.empty(0)
        self.length = 0

    def reserve(self, needed: int, like: torch.Tensor) -> None:
        """Room for `needed` entries; like: keys (n_kv, T, head_dim) of the forward about to be stored."""
        capacity = self.k.shape[1] if self.k.ndim == 3 else 0
        if needed <= capacity:
            return
        shape = (like.shape[0], max(needed, 2 * capacity, 256), like.shape[-1])
        k, v = torch.empty(shape, dtype=like.dtype), torch.empty(shape, dtype=like.dtype)
        if self.length:
            k[:, : self.length], v[:, : self.length] = self.k[:, : self.length], self.v[:, : self.length]
        self.k, self.v = k, v


class DraftHead(nn.Module):
    """The head's layer; see the module docstring. forward(embeds, feats) -> predicted features."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        H, q_width, kv_width = cfg.hidden, cfg.n_heads * cfg.head_dim, cfg.n_kv * cfg.head_dim
        self.norm_embed, self.norm_feat = RMSNorm(H, cfg.eps), RMSNorm(H, cfg.eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.norm1, self.norm2, self.norm_out = RMSNorm(H, cfg.eps), RMSNorm(H, cfg.eps), RMSNorm(H, cfg.eps)
        self.q_proj = nn.Linear(H, q_width, bias=True)
        self.k_proj = nn.Linear(H, kv_width, bias=True)
        self.v_proj = nn.Linear(H, kv_width, bias=True)
        self.o_proj = nn.Linear(q_width, H, bias=False)
        self.gate_proj = nn.Linear(H, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, H, bias=False)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def forward(self, embeds: torch.Tensor, feats: torch.Tensor, start: int = 0,
                cache: HeadCache | None = None) -> torch.Tensor:
        """embeds, feats (B, T, H) of entries start..start+T-1 -> predicted features (B, T, H).
        With a cache (B = 1) the entries attend to the cached ones before them."""
        x = self.inputs(embeds, feats)
        q, k, v = self.qkv(x, start)
        T = x.shape[1]
        mask, causal = None, T > 1
        if cache is not None:
            cache.reserve(start + T, k[0])
            cache.k[:, start : start + T], cache.v[:, start : start + T] = k[0], v[0]
            k, v = cache.k[None, :, : start + T], cache.v[None, :, : start + T]
            cache.length = start + T
            if start and T > 1:
                mask, causal = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start), False
        return self.finish(x, self.attend(q, k, v, mask, causal))

    # the parts of forward, also used by training's unrolled passes (training/head.py)

    def inputs(self, embeds: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.norm_embed(embeds), self.norm_feat(feats)], dim=-1))

    def qkv(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) at positions start.. -> rotated q (B, nh, T, d), k and v (B, n_kv, T, d)."""
        cfg, (B, T, _) = self.cfg, x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, cfg.n_kv, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, cfg.n_kv, cfg.head_dim).transpose(1, 2)
        angles = torch.arange(start, start + T, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq[None]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (T, d)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def attend(self, q, k, v, mask=None, causal: bool = False) -> torch.Tensor:
        cfg = self.cfg
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             enable_gqa=cfg.n_kv != cfg.n_heads)  # (B, nh, T, d)
        B, _, T, _ = out.shape
        return out.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self.o_proj(attn)
        h = self.norm2(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.norm_out(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# ---- the target a head belongs to ---------------------------------------------------------------------

def target_key(model: nn.Module) -> str:
    """What ties a head to its target: sha256 over the input embedding's shape and a strided sample
    of its values. The embedding's values are the same in float32, in int8 (it stays float) and in q4k
    (the GGUF's own rows, de-quantised to the same floats), so one head serves the target in all three."""
    embed = input_embedding(model)
    shape = (embed.num_embeddings, embed.embedding_dim)
    numel = shape[0] * shape[1]
    flat = torch.arange(0, numel, max(1, numel // 4096))[:4096]
    sample = embedding_values(embed, flat).float().contiguous().cpu()
    h = hashlib.sha256(f"{shape};".encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()


# ---- files ---------------------------------------------------------------------------------------------

@dataclass
class HeadFile:
    """A trained head as stored: its config, weights, drafting vocabulary and where it came from."""

    cfg: HeadConfig
    state: dict[str, torch.Tensor]
    vocab: DraftVocab
    target: str  # the target's name when it was trained
    target_key: str
    info: dict  # training data, steps, tokens, loss, acceptance measured at the end

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> str:
        """Write the head (weights in `dtype`) and return the file's sha256."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.state.items()}
        tensors["vocab_ids"] = self.vocab.ids.to(torch.int32)
        meta = {"format": FORMAT, "config": asdict(self.cfg), "target": self.target, "target_key": self.target_key,
                "vocab_size": self.vocab.vocab_size, "vocab_source": self.vocab.source, "info": self.info}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"adaspec-head": json.dumps(meta)})
        return file_sha256(path)

    @classmethod
    def load(cls, path: str | Path) -> "HeadFile":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise AdaspecError(f"no draft head at {path}: train one with `adaspec train-head --out {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["adaspec-head"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a damaged or foreign file: safetensors, JSON and key errors alike
            raise AdaspecError(f"{path} is not a readable adaspec draft head ({e}); retrain it with "
                               "`adaspec train-head`") from None
        if meta.get("format") != FORMAT:
            raise AdaspecError(f"{path} is a draft head of format {meta.get('format')}, this adaspec reads "
                               f"format {FORMAT}: retrain it with `adaspec train-head`")
        ids = tensors.pop("vocab_ids").long()
        vocab = DraftVocab(ids, int(meta["vocab_size"]), meta.get("vocab_source", ""))
        # kept as stored (float16: half the memory while a loaded engine has not drafted yet); build()
        # copies them into the float32 head
        return cls(HeadConfig(**meta["config"]), tensors, vocab, meta["target"], meta["target_key"], meta.get("info", {}))

    def build(self) -> DraftHead:
        head = DraftHead(self.cfg)
        missing, unexpected = head.load_state_dict(self.state, strict=False)
        if missing or unexpected:
            raise AdaspecError(f"draft head weights do not fit its config (missing {missing}, unexpected {unexpected})")
        return head.eval()




# ---- the drafter ---------------------------------------------------------------------------------------

class HeadDrafter:
    """Drafts with a DraftHead from the target's features (see the module docstring)."""

    def __init__(self, head: DraftHead, target, vocab: DraftVocab, *, name: str = "head", fast: bool = True,
                 source: dict | None = None):
        model = getattr(target, "model", None)
        if not isinstance(model, nn.Module):
            raise AdaspecError(f"{target.name}: a draft head needs a torch target model")
        if vocab.vocab_size != target.vocab_size:
            raise AdaspecError(f"the head's drafting vocabulary is for {vocab.vocab_size} tokens, the target "
                               f"{target.name} has {target.vocab_size}")
        if head.cfg.hidden != input_embedding(model).embedding_dim:
            raise AdaspecError(f"the head reads {head.cfg.hidden}-wide features, {target.name} has "
                               f"{input_embedding(model).embedding_dim}")
        self.target, self.name, self.vocab_size = target, name, target.vocab_size
        self.tap = tap(target)
        self.embed = input_embedding(model)
        self.draft_ids = vocab.ids.to(target.device)
        lm = nn.Linear(head.cfg.hidden, vocab.size, bias=False, device="meta")
        lm.weight = nn.Parameter(output_rows(model, vocab.ids), requires_grad=False)
        self.head, self.lm = (_int8(head), _int8(lm)) if fast and _int8_ok(target) else (head.eval(), lm)
        del lm  # its float rows (0.2 GB for the default pair's 32k rows) once the int8 copy holds them
        self.source = dict(source or {})  # where the head came from (file, sha256), for run records
        self.cfg, self.vocab = head.cfg, vocab
        self.cache = HeadCache()
        self.real = 0  # entries computed from the target's own features
        self.price: float | None = None  # cost of a drafted token per one-token target forward (priced)
        self.forwards = 0
        self.signal_s = 0.0

    def begin(self, prompt: torch.Tensor) -> None:
        self.cache.length = self.real = 0

    def _run(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Entries cache.length.. for features (n, H) and next tokens (n,) -> predicted features (n, H)."""
        with torch.inference_mode():
            out = self.head(self.embed(tokens)[None].float(), feats[None].float(), self.cache.length, self.cache)[0]
        self.forwards += 1
        return out

    def propose(self, seq: torch.Tensor, max_k: int, ctx: DraftContext) -> Draft:
        known = self.target.length  # the target has features for positions 0..known-1
        start = min(self.cache.length, self.real)
        self.cache.length = start
        if start >= known:  # nothing new from the target (cannot happen in the decode loop's order)
            return Draft(tokens=seq.new_zeros(0), probs=None, signals=[], drafter=self.name)
        g = self._run(self.tap.features(start, known), seq[start + 1 : known + 1])[-1]
        self.real = known
        build = DraftBuilder(ctx, self.vocab_size, self.draft_ids)
        for _ in range(max_k):
            with torch.inference_mode():
                logits = self.lm(g[None])[0]  # (N,)
            token, keep = build.add(logits, max_k)
            if not keep:
                break
            g = self._run(g[None], token.reshape(1))[-1]
        self.signal_s += build.signal_s
        return build.draft(seq.device, self.name)

    def identity(self) -> dict:
        """What a benchmark run records of the head."""
        return {**self.source, "config": asdict(self.cfg), "vocab": self.vocab.size}

    def relative_cost(self, repeats: int = 5) -> float:
        """Cost of one drafted token as a fraction of a one-token target forward, measured here (median
        of `repeats`, after a 32-token context), for the drafter pool's prices. Leaves both caches empty."""
        from adaspec.calibration.cost import forward_cost

        t, context = self.target, torch.arange(32) % self.vocab_size
        target_ms = forward_cost(t, 31, (1,), repeats)[1]  # the calibration's own measurement
        t.extend(context[:-1])
        self.cache.length = 0
        g = self._run(self.tap.features(0, 31), context[1:32])[-1]

        def step() -> None:
            with torch.inference_mode():
                self.lm(g[None])
            self._run(g[None], context[:1])
            self.cache.length = 31

        step()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        head_ms = 1e3 * sorted(times)[len(times) // 2]
        t.reset()
        self.cache.length = self.real = 0
        self.forwards = 0
        return head_ms / target_ms

    def priced(self) -> float:
        """relative_cost(), measured the first time it is asked for and kept (the cost-aware length
        policy of method ``head`` and the drafter pool price the head with it). Call it between
        requests: the measurement uses the target's cache."""
        if self.price is None:
            self.price = self.relative_cost()
        return self.price

    def commit(self, valid_len: int) -> None:
        # entries past `real` were drafted from the head's own features; entry j needs token j+1
        self.real = min(self.real, valid_len - 1)
        self.cache.length = min(self.cache.length, self.real)


def _int8_ok(target) -> bool:
    return (torch.device(target.device).type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
            and embedding_dtype(input_embedding(target.model)) == torch.float32)


def _int8(module: nn.Module) -> nn.Module:
    """A copy of `module` with every Linear as one dynamic int8 call: a drafter's numbers only steer
    proposals, so the speed is free (models/quant.py, DynamicInt8Linear)."""
    import copy

    from adaspec.models.quant import DynamicInt8Linear, Int8Linear, replace_linears

    def one_call(linear: nn.Linear) -> nn.Module:
        return DynamicInt8Linear(Int8Linear.from_float(linear))

    if isinstance(module, nn.Linear):  # read, not changed: no copy of its float weights
        return one_call(module)
    module = copy.deepcopy(module).eval()
    replace_linears(module, one_call)
    return module


def load_head_drafter(path: str | Path, target, target_name: str | None = None, *, fast: bool = True) -> HeadDrafter:
    """The head stored at `path` as a drafter for `target`; refused with a clear error if it was
    trained for another target."""
    return head_drafter(open_head(path, target, target_name), path, target, fast=fast)


def open_head(path: str | Path, target, target_name: str | None = None) -> HeadFile:
    """The head file at `path`, checked to be for `target` (cheap: no drafter is built yet)."""
    stored = HeadFile.load(path)
    model = getattr(target, "model", None)
    if not isinstance(model, nn.Module):
        raise AdaspecError(f"{target.name}: a draft head needs a torch target model")
    if stored.vocab.vocab_size != target.vocab_size or stored.target_key != target_key(model):
        raise AdaspecError(f"the draft head {path} was trained for {stored.target!r}, not for "
                           f"{target_name or target.name!r}: use that target, or train a head for this one "
                           f"with `adaspec train-head --target {target_name or target.name}`")
    return stored


def head_drafter(stored: HeadFile, path: str | Path, target, *, fast: bool = True) -> HeadDrafter:
    """The drafter of an opened head file (its int8 copy, the target's output rows, the feature tap)."""
    return HeadDrafter(stored.build(), target, stored.vocab, fast=fast,
                       source={"file": Path(path).name, "sha256": file_sha256(path), "target": stored.target,
                               "steps": stored.info.get("steps"), "tokens_seen": stored.info.get("tokens_seen")})



