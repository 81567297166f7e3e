"""Adapter for any Hugging Face `AutoModelForCausalLM`, its tokenizer, and a loader.

Rollback goes through `DynamicCache.crop`, whose argument changed meaning across transformers
versions: up to 4.x it was the absolute length to keep (a negative value removed that many tokens,
and 0 emptied the cache); from 5.x it is only a negative count of tokens to remove (a positive value
raises, and 0 merely shrinks sliding-window and linear-attention layers back to their working
size). A negative count means the same in both, so `rollback` always passes one and checks
`get_seq_length()` afterwards.

Sliding-window layers (Mistral, Gemma, ...) keep only the last window of keys, so they can roll back
only as far as the last crop; layers with a recurrent state (Mamba-style hybrids) cannot roll back
at all. For those, `rollback` recomputes the kept prefix from the token ids it remembers: always
correct, slow only for models whose cache cannot be cut.

transformers is imported inside functions: `import adaspec` should not pay for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from pathlib import Path

import torch

from adaspec.config import AdaspecError
from adaspec.models.base import check_extend, check_rollback


def _as_ids(value) -> tuple[int, ...]:
    """An eos id as configs store it (None, an int or a list) -> a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class HFAdapter:
    """`ModelAdapter` over a transformers causal LM with a `DynamicCache` (batch size 1).

    `extend` returns inference-mode tensors: read them freely, clone before editing in place.
    """

    def __init__(self, model, name: str):
        from transformers import DynamicCache

        self.model = model.eval()
        self.name = name
        self._cache_cls = DynamicCache
        # 5.x: crop(tokens_to_remove <= 0); 4.x: crop(max_length), where crop(0) empties the cache
        self._crop_counts = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters
        # only the last position's logits: `logits_to_keep` from transformers 4.50, `num_logits_to_keep` before
        forward = inspect.signature(model.forward).parameters
        self._keep_arg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in forward), None)
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"  # transformers 5 renamed it
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        out = model.get_output_embeddings()
        rows = getattr(out, "out_features", None) or (out.weight.shape[0] if out is not None else config.vocab_size)
        self.vocab_size = int(rows)  # a quantised head (models/quant.py) has out_features, no float weight
        gen = getattr(model, "generation_config", None)
        self.eos_token_ids = _as_ids(getattr(gen, "eos_token_id", None)) or _as_ids(config.eos_token_id)
        self.max_length = next(
            (getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx") if getattr(config, k, None)),
            None,
        )
        self.device = next(model.parameters()).device
        self.reset()

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        try:
            self._cache = self._cache_cls(config=self.model.config)  # sliding / linear layers where the model has them
        except TypeError:  # transformers 4.x before caches took a config
            self._cache = self._cache_cls()
        if hasattr(self._cache, "activate_past_recording"):
            # keep every state until the next crop, so that crop can undo more than one forward
            self._cache.activate_past_recording()
        self._length = 0
        self._floor = 0  # shortest length crop can restore exactly
        self._pieces: list[torch.Tensor] = []  # every id in the cache, for recomputation

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(ids, keep_all=True)

    def absorb(self, ids: torch.Tensor) -> None:
        """extend without wanting logits (a prefill): the head runs on the last position only."""
        self._forward(ids, keep_all=False)

    def _forward(self, ids: torch.Tensor, keep_all: bool) -> torch.Tensor:
        n = check_extend(self, ids)
        ids = ids.to(self.device, torch.long)
        extra = {} if keep_all or self._keep_arg is None else {self._keep_arg: 1}
        with torch.inference_mode():
            out = self.model(input_ids=ids[None], **{self._cache_arg: self._cache}, use_cache=True, **extra)  # (1, n, V)
        self._pieces.append(ids)
        self._length += n
        return out.logits[0]  # (n, V)

    def rollback(self, length: int) -> None:
        check_rollback(self, length)
        if length == 0:
            self.reset()
            return
        if length >= self._floor and self._crop(self._length - length):
            self._length = length
            ids = torch.cat(self._pieces)[:length]
            self._pieces = [ids]
            return
        self._recompute(torch.cat(self._pieces)[:length])

    def _crop(self, remove: int) -> bool:
        """Cut `remove` tokens off the cache; False when the cache cannot be cut exactly."""
        layers = getattr(self._cache, "layers", [])
        if not getattr(self._cache, "is_croppable", True):
            return False
        windowed = any(getattr(layer, "is_sliding", False) or hasattr(layer, "conv_states") for layer in layers)
        if remove == 0 and not self._crop_counts:
            return True  # old semantics: crop(0) would empty the cache
        with torch.inference_mode():
            self._cache.crop(-remove)
        kept = self._length - remove
        if self._cache.get_seq_length() != kept:
            return False
        # a windowed layer keeps only a window of states before the point it was cut at
        self._floor = kept if windowed else 0
        return True

    def _recompute(self, ids: torch.Tensor) -> None:
        self.reset()
        self.absorb(ids)


class HFTokenizer:
    """`Tokenizer` over a transformers tokenizer.

    `encode` adds no special tokens except a leading BOS when the tokenizer is configured to add
    one (`add_bos_token`, as Llama-style models expect); it never appends EOS. Chat prompts come from
    the tokenizer's chat template, which places its own special tokens; a tokenizer without one
    gets the message contents joined by newlines.
    """

    def __init__(self, tok, eos_token_ids: tuple[int, ...] | None = None):
        self.tok = tok
        own = _as_ids(tok.eos_token_id)
        self.eos_token_ids = tuple(dict.fromkeys((eos_token_ids or ()) + own))  # model's first, no repeats
        self._add_bos = bool(getattr(tok, "add_bos_token", False)) and tok.bos_token_id is not None
        self._vocab: dict[str, int] | None = None

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.tok.bos_token_id] + ids if self._add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            return self.encode("\n".join(m["content"] for m in messages) + "\n")
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding by default, 4.x a list of ids
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        if isinstance(out, torch.Tensor):
            out = out.tolist()
        if out and isinstance(out[0], list):  # a batch of one
            out = out[0]
        return [int(i) for i in out]

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self.tok.get_vocab()
        return self._vocab

    def same_vocab(self, other) -> bool:
        return isinstance(other, HFTokenizer) and self.get_vocab() == other.get_vocab()


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56


def _resolve(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """source (hub id, folder or .gguf path) -> (hub id or folder, gguf file name or None)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AdaspecError(f"GGUF file not found: {source}")
        if gguf_file is not None and gguf_file != path.name:
            raise AdaspecError(f"{source} is already a GGUF file; do not also pass gguf_file={gguf_file!r}")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise AdaspecError(f"{source} is a file but not a .gguf one; pass the model's folder instead")
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise AdaspecError(f"GGUF file {gguf_file!r} not found in {source}")
        return str(path), gguf_file
    # a hub id is "name" or "owner/name"; anything else was meant as a local path
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise AdaspecError(f"model folder not found: {source}")
    return source, gguf_file


@contextlib.contextmanager
def _quiet_loading():
    """No per-tensor progress bar from transformers on every load (the CLI prints its own lines)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_hf(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    gguf_file: str | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> tuple[HFAdapter, HFTokenizer]:
    """Load a causal LM and its tokenizer from a hub id, a local folder or a .gguf file path.

    GGUF weights are dequantised to `dtype`. `threads` sets torch's intra-op thread count, which is
    process-wide.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    where, gguf_file = _resolve(source, gguf_file)
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise AdaspecError(f"loading {gguf_file} needs the gguf package: pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        with _quiet_loading():
            tok = AutoTokenizer.from_pretrained(where, **extra)
            model = AutoModelForCausalLM.from_pretrained(where, **{_dtype_kwarg(): dtype}, **extra)
    except ImportError as e:
        raise AdaspecError(f"could not load {source}: {e}; for GGUF files: pip install gguf accelerate") from e
    except Exception as e:  # hub errors, missing files and bad configs all surface here
        fix = ("the files there are damaged or incomplete: replace them (a preset's converted copy is rebuilt by "
               "`adaspec models pull NAME`)" if Path(source).exists() else
               "pass a local folder or GGUF path, or a preset name (`adaspec models list`)")
        raise AdaspecError(f"could not load {source}: {e}; {fix}") from e
    model.to(device).eval()
    adapter = HFAdapter(model, name=Path(gguf_file).stem if gguf_file else source)
    return adapter, HFTokenizer(tok, eos_token_ids=adapter.eos_token_ids)
