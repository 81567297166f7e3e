"""A tiny built-in GPT over bytes: a toy target or drafter for tests and examples.

The model keeps a static KV cache indexed by position, as gpt-fast does: `forward(ids, start_pos)`
writes keys and values at start_pos..start_pos+n-1 and attends causally over [0, start_pos + n).
Rollback therefore only moves a position; entries past it are overwritten by the next forward.

Weights are drawn from a seeded generator with a large std on the embeddings and the output head,
so next-token distributions are peaky and varied: a mix of confident and uncertain positions is
what the adaptive policies and their tests need. Initialising in float32 and then casting means a
float32 and a float64 model with the same seed hold the same weights up to rounding.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adaspec.config import AdaspecError
from adaspec.models.base import check_extend, check_rollback

BOS, EOS, PAD = 256, 257, 258  # the three specials after the 256 byte ids


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 259  # 256 bytes + BOS, EOS, PAD
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    max_len: int = 512  # context window, also the size of the static KV cache
    dtype: torch.dtype = torch.float32  # float64 where rounding could blur a comparison
    seed: int = 0
    embed_std: float = 0.5  # embeddings and output head: large, so distributions are not near-uniform
    hidden_std: float = 0.1  # attention and MLP projections

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise AdaspecError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.dtype not in (torch.float32, torch.float64):
            raise AdaspecError(f"TinyConfig.dtype must be torch.float32 or torch.float64, got {self.dtype}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.fc_out = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def attn(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: int) -> torch.Tensor:
        n = x.shape[0]
        end = start_pos + n
        q, k, v = self.qkv(x).view(n, 3, self.n_head, self.head_dim).unbind(1)  # 3 x (n, H, D)
        k_cache[start_pos:end] = k  # overwrites any stale entries left by a rollback
        v_cache[start_pos:end] = v
        keys, values = k_cache[:end], v_cache[:end]  # (T, H, D) with T = start_pos + n
        scores = torch.einsum("nhd,thd->hnt", q, keys) / math.sqrt(self.head_dim)  # (H, n, T)
        q_pos = torch.arange(start_pos, end, device=x.device)[:, None]  # (n, 1)
        k_pos = torch.arange(end, device=x.device)[None, :]  # (1, T)
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out = torch.einsum("hnt,thd->nhd", scores.softmax(-1), values)  # (n, H, D)
        return self.proj(out.reshape(n, -1))  # (n, C)

    def forward(self, x, k_cache, v_cache, start_pos):
        x = x + self.attn(self.ln_1(x), k_cache, v_cache, start_pos)
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_len, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._init_weights()
        self.to(cfg.dtype)
        cache_shape = (cfg.n_layer, cfg.max_len, cfg.n_head, cfg.head_dim)
        # persistent=False: the cache is state of a sequence, not of the model, so state_dict skips it
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=cfg.dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=cfg.dtype), persistent=False)

    @torch.no_grad()
    def _init_weights(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed)
        for name, p in self.named_parameters():
            if name.startswith("ln") or ".ln_" in name:
                continue  # LayerNorm keeps weight 1, bias 0
            if name.endswith("bias"):
                p.zero_()
                continue
            big = name.startswith(("wte", "wpe", "head"))
            std = self.cfg.embed_std if big else self.cfg.hidden_std
            p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        """ids (n,) at positions start_pos..start_pos+n-1 -> logits (n, V)."""
        n = ids.shape[0]
        pos = torch.arange(start_pos, start_pos + n, device=ids.device)
        x = self.wte(ids) + self.wpe(pos)  # (n, C)
        for i, block in enumerate(self.blocks):
            x = block(x, self.k_cache[i], self.v_cache[i], start_pos)
        return self.head(self.ln_f(x))  # (n, V)


class TinyAdapter:
    """`ModelAdapter` over a TinyGPT: the cache is the model's static buffers plus a position."""

    def __init__(self, model: TinyGPT, name: str = "tiny"):
        self.model = model.eval()
        self.name = name
        self.vocab_size = model.cfg.vocab_size
        self.eos_token_ids = (EOS,)
        self.max_length = model.cfg.max_len
        self.device = model.k_cache.device
        self._pos = 0

    @property
    def config(self) -> TinyConfig:
        return self.model.cfg

    @property
    def length(self) -> int:
        return self._pos

    def reset(self) -> None:
        self._pos = 0  # stale cache entries are overwritten before they are ever attended to

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        n = check_extend(self, ids)
        with torch.inference_mode():
            logits = self.model(ids.to(self.device, torch.long), self._pos)  # (n, V)
        self._pos += n
        return logits

    def rollback(self, length: int) -> None:
        check_rollback(self, length)
        self._pos = length


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, name: str | None = None, **cfg) -> TinyAdapter:
    """A fresh TinyGPT adapter; `cfg` overrides TinyConfig fields (n_layer, n_embd, max_len, ...)."""
    config = TinyConfig(seed=seed, dtype=dtype, **cfg)
    return TinyAdapter(TinyGPT(config), name=name or f"tiny-{seed}")


def perturbed_copy(adapter: TinyAdapter, noise: float, seed: int = 0) -> TinyAdapter:
    """The same weights plus Gaussian noise of `noise` times each tensor's RMS (its std when
    zero-mean), so the copy agrees with its source's argmax at some positions but not all."""
    model = copy.deepcopy(adapter.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p.double().pow(2).mean().sqrt().item()  # zero biases stay zero
            p.add_((torch.randn(p.shape, generator=g, dtype=torch.float64) * noise * scale).to(p.dtype))
    return TinyAdapter(model, name=f"{adapter.name}+noise{noise:g}")


def random_model(seed: int = 0, dtype: torch.dtype = torch.float64, **cfg) -> TinyAdapter:
    """A TinyGPT whose weights are unrelated to `tiny_model(seed)` (a drafter that rarely agrees)."""
    # offset the seed so that random_model(0) is not tiny_model(0)
    return tiny_model(seed=seed + 1_000_003, dtype=dtype, name=f"random-{seed}", **cfg)


class ByteTokenizer:
    """`Tokenizer` over UTF-8 bytes: ids 0..255 are bytes, 256 = BOS, 257 = EOS, 258 = PAD."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD
    eos_token_ids = (EOS,)
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # a draft can stop in the middle of a multi-byte character: replace, never raise
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
        return [BOS] + self.encode(text)

    def same_vocab(self, other) -> bool:
        return isinstance(other, ByteTokenizer)
