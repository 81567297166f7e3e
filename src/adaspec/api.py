"""The public API: load a target/drafter pair once, then generate, stream or compare.

    engine = adaspec.load(target="qwen2.5-coder-1.5b", drafter="qwen2.5-coder-0.5b")
    result = engine.generate("Write a quicksort in Python.", method="cmasd", max_new_tokens=128)

``adaspec.generate(prompt, target=..., drafter=..., **options)`` does both in one call.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from adaspec.calibration.cost import cost_here
from adaspec.calibration.identity import TOY_MODELS, model_identity
from adaspec.calibration.profile import Profile, load_profile
from adaspec.config import AdaspecError, GenerationConfig, SpecConfig, check_text, make_config
from adaspec.decode import check_vocab, speculative_generate
from adaspec.drafters.base import Drafter
from adaspec.drafters.head import HeadDrafter, head_drafter, open_head
from adaspec.drafters.hybrid import HeadOrLookup
from adaspec.drafters.model import ModelDrafter
from adaspec.drafters.ngram import NGramDrafter
from adaspec.drafters.pool import DrafterPool
from adaspec.drafters.vocab import DraftVocab, PrunedAdapter, cut_output_head, vocab_for
from adaspec.models.base import ModelAdapter, Tokenizer
from adaspec.models.packed import release_freed_memory
from adaspec.plan import Speculation, prepare, resolve_knobs
from adaspec.policies.cost import FALLBACK_DRAFTER, fallback_target_cost
from adaspec.records import Result
from adaspec.stopping import StopStrings

__all__ = ["DEFAULT_DRAFTER", "DEFAULT_TARGET", "Engine", "Stream", "generate", "load", "load_model", "make_config"]

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b"
DRAFTER_RUNTIMES = ("auto", "hf")
TARGET_RUNTIMES = ("auto", "hf")
QUANTS = ("auto", "none", "int8", "q4k", "q4k-a16")
# The fastest lossless method measured for the default pair with its shipped profile: first or tied
# in docs/results/spec-bench-256 (1.19x ar, cost-aware 1.17x) and held-out-256 (1.28x, tied with
# cost-aware), and well ahead on HumanEval (docs/results/humaneval-int8). Engine.default_method
# falls back from it.
DEFAULT_METHOD = "multi-draft-calibrated"
# With a draft head loaded (the default target ships one), its method is the default instead: on the
# q4k runtime the 0.5B drafter costs half a target step and multi-draft-calibrated fell to 0.98x `ar`
# on Spec-Bench, while `head` gave 1.15x (docs/results/spec-bench-q4k-s11); session 12, with the head
# retrained on 1,913 answers: `head` 1.17x `ar` and 1.48x llama.cpp, multi-draft-calibrated 0.99x
# (docs/results/spec-bench-q4k-s12). Session 14, with prompt lookup beside the head: `head-lookup`
# 1.35x `ar` and 1.59x llama.cpp on 30 Spec-Bench prompts, `head` 1.22x
# (docs/results/spec-bench-head-lookup-s14).
HEAD_METHOD = "head-lookup"
# Calibration profiles shipped with the package: (target, drafter, quant) -> file in calibration/profiles.
SHIPPED_PROFILES = {(DEFAULT_TARGET, DEFAULT_DRAFTER, "q4k"): "qwen2.5-coder-q4k.json",
                    (DEFAULT_TARGET, DEFAULT_DRAFTER, "q4k-a16"): "qwen2.5-coder-q4k-a16.json",
                    (DEFAULT_TARGET, DEFAULT_DRAFTER, "int8"): "qwen2.5-coder-int8.json"}
# Draft heads shipped with the package (drafters/heads/): target preset -> (file, sha256 of the file).
# Trained by `adaspec train-head` (docs/method.md, "Draft head"; curve in docs/results/draft-head).
SHIPPED_HEADS: dict[str, tuple[str, str]] = {
    DEFAULT_TARGET: ("qwen2.5-coder-1.5b-head.safetensors",
                     "b43f7b5d30bc6cebcf3375ad3d20de0fdeede2519caaf2f2e3dd4d61c5dbcbee"),
}


def resolve_quant(quant: str | None, source, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str | None:
    """The quantisation a model loads with. "auto" (the default), for a real float32 model on the
    CPU: q4k where the model comes from a GGUF file (a preset or a .gguf path: its own Q4_K
    weights, the fastest form measured, docs/runtime.md) and the CPU runs the vectorised Q4_K
    kernel (AVX-512 VNNI), int8 otherwise (a model folder, a hub id, another CPU); none for the
    built-in toy models, adapters passed in, GPUs and other dtypes. "none" or None: as loaded;
    "int8" / "q4k" / "q4k-a16": that."""
    if quant not in (None, *QUANTS):
        raise AdaspecError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANTS)}")
    if quant == "auto":
        real = isinstance(source, str) and source not in TOY_MODELS
        if not (real and dtype == torch.float32 and torch.device(device).type == "cpu"):
            return None
        from adaspec.models.q4k import vectorised_here
        from adaspec.models.registry import PRESETS

        gguf = source in PRESETS or source.lower().endswith(".gguf")
        return "q4k" if gguf and vectorised_here() else "int8"
    return None if quant == "none" else quant


def shipped_profile(target, drafter, quant: str | None) -> Path | None:
    """The profile that ships for this pair and quantisation, if any."""
    name = SHIPPED_PROFILES.get((target, drafter, quant)) if isinstance(target, str) and isinstance(drafter, str) else None
    return Path(__file__).parent / "calibration" / "profiles" / name if name else None


def load_model(source: str | ModelAdapter, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quant: str | None = None, role: str = "target", drafter_runtime: str = "auto",
               target_runtime: str = "auto",
               draft_vocab: "int | str | Path | DraftVocab | None" = None) -> tuple[ModelAdapter, Tokenizer | None]:
    """A model adapter (and its tokenizer) from a preset name, path, hub id or built-in tiny model.

    Built-in toy models: ``tiny`` (seeded random GPT over bytes) and ``tiny-draft`` (a perturbed
    copy of it that agrees only sometimes), used by the tests and for trying the CLI without weights.

    role="drafter" with drafter_runtime="auto": an int8 Llama-family drafter runs on adaspec's own
    runtime with one kernel call per projection (models/fast.py; its cost against transformers'
    forward is in docs/method.md); drafters only steer proposals, so this never changes what is
    generated. drafter_runtime="hf" keeps transformers' forward.

    role="target" with target_runtime="auto": a q4k Llama-family target runs on the same runtime
    with exact rows (every row's logits independent of the other rows of its forward, as lossless
    verification needs) and its Q4_K projections fused (q, k, v; gate, up: one kernel call each, on
    the same weights, no copy): 60 against 67 ms per step of the 1.5B (docs/runtime.md).
    target_runtime="hf" keeps transformers' forward. An int8 target stays on transformers' forward
    (chosen while fusing int8 projections still copied their weights; it no longer does, and moving
    int8 targets has not been measured end to end).

    quant: "auto" (q4k for a GGUF model on the CPU, int8 for another real one), "none", "int8", "q4k"
    or "q4k-a16" (resolve_quant): q4k's weights with activations carried at about 15 bits instead of
    8 (models/extension.ACTS), closer to the float32 model and dearer per row (docs/runtime.md). A
    q4k GGUF model is read from its packed copy (models/packed.py: what runs and nothing else, built
    at the first load), except with draft_vocab, which cuts the float head first.
    draft_vocab (drafters only): a pruned drafting vocabulary, as a DraftVocab, its JSON file, or
    a size N (the N most frequent tokens of the default corpus, drafters/vocab.py); the output
    head is cut to those rows before quantisation.
    """
    quant = resolve_quant(quant, source, device=device, dtype=dtype)
    acts = None
    if quant == "q4k-a16":  # q4k's weights and layers; only the activations' form differs (set at the end)
        quant, acts = "q4k", "a16"
    if drafter_runtime not in DRAFTER_RUNTIMES:
        raise AdaspecError(f"unknown drafter runtime {drafter_runtime!r}; choose one of {', '.join(DRAFTER_RUNTIMES)}")
    if target_runtime not in TARGET_RUNTIMES:
        raise AdaspecError(f"unknown target runtime {target_runtime!r}; choose one of {', '.join(TARGET_RUNTIMES)}")
    if not isinstance(source, str):
        return source, None
    check_device(device)
    if source in TOY_MODELS:
        if torch.device(device).type != "cpu":
            raise AdaspecError(f"the built-in toy models run on the CPU only, not on {device!r}: drop --device")
        from adaspec.models.tiny import ByteTokenizer, perturbed_copy, tiny_model

        adapter = tiny_model(seed=0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if source == "tiny-draft":
            adapter = perturbed_copy(adapter, noise=0.5, seed=1)
        tokenizer = ByteTokenizer()
    elif quant == "q4k" and draft_vocab is None and _gguf_source(source):
        from adaspec.models.registry import load_q4k

        adapter, tokenizer = load_q4k(source)  # already in its q4k form (models/packed.py)
    else:
        from adaspec.models.registry import load_pretrained

        adapter, tokenizer = load_pretrained(source, dtype=dtype, device=device)
    vocab = None
    if draft_vocab is not None:
        vocab = resolve_draft_vocab(draft_vocab, tokenizer, adapter)
        cut_output_head(getattr(adapter, "model", None), vocab.ids)
    if quant:
        from adaspec.models.quant import is_quantized, quantize_adapter

        if not is_quantized(adapter):  # a packed q4k copy arrives quantised; nothing to resolve or pack
            gguf = pack = None
            if quant == "q4k" and (gguf := _gguf_file(source)) is not None:
                from adaspec.models.registry import pack_cache

                pack = pack_cache(source)
            # also makes attention row-wise (models/invariant.py)
            adapter = quantize_adapter(adapter, quant, gguf=gguf, pack_cache=pack)
        drafter = role == "drafter"
        from adaspec.models.fast import FastDecoder, supports

        if (drafter and drafter_runtime == "auto") or (not drafter and target_runtime == "auto" and quant == "q4k"):
            model = getattr(adapter, "model", None)
            ready = isinstance(adapter, FastDecoder) and adapter.exact_rows == (not drafter)  # a packed q4k copy
            if supports(model) is None and not ready:
                adapter = FastDecoder(model, adapter.name, exact_rows=not drafter)
        elif isinstance(adapter, FastDecoder):  # a packed q4k copy (plain torch modules) asked to run on transformers
            from adaspec.models.hf import HFAdapter
            from adaspec.models.light import transformers_model

            adapter = HFAdapter(transformers_model(adapter.model), adapter.name)
        if acts is not None:
            from adaspec.models.extension import set_activations

            set_activations(adapter.model, acts)
    if vocab is not None:
        adapter = PrunedAdapter(adapter, vocab)
    if quant == "q4k":
        release_freed_memory()  # fusing the projections above freed their loaded copies (0.12 GB for the pair)
    return adapter, tokenizer


def resolve_draft_vocab(spec, tokenizer: Tokenizer | None, adapter: ModelAdapter) -> DraftVocab:
    """A DraftVocab from a DraftVocab, a JSON file of one, or a size (counted on the default corpus
    with the drafter's tokenizer; the EOS ids are always kept)."""
    if isinstance(spec, DraftVocab):
        vocab = spec
    elif isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        if tokenizer is None:
            raise AdaspecError("a drafting vocabulary by size needs the drafter's tokenizer to count tokens with; "
                               "give a vocabulary file instead")
        from adaspec.models.registry import cache_dir

        vocab = vocab_for(tokenizer, adapter.vocab_size, int(spec), always=adapter.eos_token_ids,
                          cache=cache_dir() / "vocab")
    else:
        vocab = DraftVocab.load(spec)
    if vocab.vocab_size != adapter.vocab_size:
        raise AdaspecError(f"the drafting vocabulary is for {vocab.vocab_size} tokens, the drafter has "
                           f"{adapter.vocab_size}")
    return vocab


def check_device(device: str) -> None:
    """A device torch knows and this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise AdaspecError(f"unknown device {device!r} ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdaspecError(f"device {device!r} asked for, but this torch sees no CUDA GPU: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise AdaspecError(f"device {device!r} is not supported: use cpu or cuda")


def _gguf_source(source: str) -> bool:
    """Whether `source` names a GGUF model (a preset, a .gguf file, a folder holding one), without pulling."""
    from adaspec.models.registry import PRESETS, resolve

    return source in PRESETS or (source not in TOY_MODELS and resolve(source).gguf_file is not None)


def _gguf_file(source: str) -> str | None:
    """The GGUF file a preset or a local .gguf path loads from, else None."""
    if source in TOY_MODELS:
        return None
    from adaspec.models.registry import resolve

    resolved = resolve(source)
    return str(resolved.gguf_path) if resolved.gguf_file is not None else None


def early_exit_drafter(target: ModelAdapter, n_layers: int) -> tuple[ModelDrafter, float]:
    """A drafter running the target's first n_layers layers, its final norm and head (shared weights),
    and its cost relative to a one-token target forward, estimated as the share of weights it reads."""
    from adaspec.models.fast import FastDecoder, supports

    model = getattr(target, "model", None)
    why = supports(model)
    if why is not None:
        raise AdaspecError(f"an early-exit drafter needs a Llama-family transformers target: {why}")
    adapter = FastDecoder(model, f"{target.name}-exit{n_layers}", n_layers=n_layers, exact_rows=False)
    layers = model.model.layers
    per_layer = _linear_weights(layers[0])
    head = target.vocab_size * model.config.hidden_size
    share = (n_layers * per_layer + head) / (len(layers) * per_layer + head)
    return ModelDrafter(adapter, name=adapter.name), share


def shipped_head(target) -> Path | None:
    """The draft head that ships for this target preset, checked against its recorded sha256."""
    from adaspec.models.registry import file_sha256

    entry = SHIPPED_HEADS.get(target) if isinstance(target, str) else None
    if entry is None:
        return None
    path = Path(__file__).parent / "drafters" / "heads" / entry[0]
    if not path.is_file() or file_sha256(path) != entry[1]:
        raise AdaspecError(f"the draft head shipped for {target} ({path}) is missing or damaged: reinstall "
                           "adaspec, or pass head=False (--head none)")
    return path


def _linear_weights(module) -> int:
    """Weights in a module's linear layers, float or int8 (whose packed weights are not parameters)."""
    return sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int))


class Engine:
    """A loaded target (and optional drafter model) with their tokenizer, reusable across requests.

    ``drafter`` is the drafter model's adapter; each request gets the drafter its method names
    (``prepare``): none, that model, prompt lookup, or a pool of them.

    profile: a calibration profile of this very pair. Its cost model is used only on the machine
    and thread count it was measured with; elsewhere (``local_cost``) the pair's costs are
    measured here once and cached (calibration.cost.cost_here).
    """

    def __init__(self, target: ModelAdapter, drafter: ModelAdapter | None = None,
                 tokenizer: Tokenizer | None = None, *, drafter_tokenizer: Tokenizer | None = None,
                 chat: bool = True, target_name: str | None = None, drafter_name: str | None = None,
                 profile: Profile | str | Path | None = None, local_cost: bool = True):
        if drafter is not None and tokenizer is not None and drafter_tokenizer is not None \
                and not tokenizer.same_vocab(drafter_tokenizer):
            raise AdaspecError("drafter and target use different tokenizers: speculative decoding needs a "
                               "drafter from the same model family (same vocabulary)")
        if drafter is not None:
            check_vocab(target, drafter)
        self.target, self.drafter, self.tokenizer, self.chat = target, drafter, tokenizer, chat
        # More model drafters for the pool methods (e.g. an early-exit drafter): (drafter, cost per
        # drafted token as a fraction of one one-token target forward). Append after loading.
        self.extra_drafters: list[tuple[Drafter, float]] = []
        self._head: HeadDrafter | None = None  # the draft head (method "head"; also in the pool)
        self._head_file: tuple | None = None  # (HeadFile, path) checked at use_head, built at first use
        self.target_name = target_name or target.name
        self.drafter_name = drafter_name or (drafter.name if drafter is not None else None)
        self.profile: Profile | None = None  # read by calibrated methods
        self.local_cost = local_cost
        if profile is not None:
            self.use_profile(profile)

    def use_profile(self, profile: Profile | str | Path, *, shipped: bool = False) -> None:
        """Read this calibration profile from now on. A profile made for another pair is refused
        (AdaspecError); a shipped one that does not fit is passed over with a warning. With
        local_cost, a profile made elsewhere prices drafts with this machine's costs."""
        p = load_profile(profile)
        ids = (model_identity(self.target, self.target_name),
               model_identity(self.drafter, self.drafter_name) if self.drafter is not None else None)
        try:
            p.check_pair(*ids)
        except AdaspecError as e:
            if not shipped:
                raise
            warnings.warn(f"the profile shipped for this pair does not fit the models loaded ({e}); calibrated "
                          "methods use their fallbacks", stacklevel=3)
            return
        if self.local_cost:
            from adaspec.models.registry import cache_dir

            here = cost_here(p.cost, self.target, self.drafter, cache=cache_dir() / "costs",
                             identity="|".join(str(i.get("fingerprint") or i.get("name")) for i in ids))
            p = dataclasses.replace(p, cost=here)
        self.profile = p

    def use_head(self, head: HeadDrafter | str | Path, *, pool: bool = False, cost: float | None = None) -> None:
        """Draft with this head (a HeadDrafter, or the path of a head file for this target): method
        ``head``; pool=True also makes it one more drafter of the pool methods. Both price it by its
        cost measured here (HeadDrafter.priced), or by `cost` (a drafted token as a fraction of a
        target forward) when given.
        Off by default: the shipped head did not help the pool in any run (docs/method.md, "Draft head")."""
        if cost is not None and not cost > 0:
            raise AdaspecError(f"a head's cost is a positive fraction of a target forward, got {cost!r}")
        self.extra_drafters = [(d, c) for d, c in self.extra_drafters if not isinstance(d, HeadDrafter)]
        if isinstance(head, HeadDrafter):
            self._head, self._head_file = head, None
        else:  # checked now; its drafter (int8 copy, output rows, feature tap: seconds) is built at first use
            self._head, self._head_file = None, (open_head(head, self.target, self.target_name), head)
        if cost is not None:
            self.head.price = float(cost)
        if pool:
            self.extra_drafters.append((self.head, self.head.priced()))

    @property
    def head(self) -> HeadDrafter | None:
        """The draft head, built from its file the first time a request or a caller needs it."""
        if self._head is None and self._head_file is not None:
            stored, path = self._head_file
            self._head, self._head_file = head_drafter(stored, path, self.target), None
            release_freed_memory()  # the float head and output rows its int8 copies were made from
        return self._head

    def encode(self, prompt: str | list[int] | list[dict], *, chat: bool | None = None) -> list[int]:
        """Prompt ids from text (chat template applied unless chat=False), token ids or chat messages."""
        chat = self.chat if chat is None else chat
        if isinstance(prompt, str):
            if not prompt:
                raise AdaspecError("the prompt is empty: give at least one character of text")
            self._need_tokenizer()
            check_text(prompt, "the prompt")
            if chat:
                return self._tokenize(lambda: self.tokenizer.chat_ids([{"role": "user", "content": prompt}]))
            return self._tokenize(lambda: self.tokenizer.encode(prompt))
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            self._need_tokenizer()
            for i, m in enumerate(prompt):
                if not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
                    raise AdaspecError(f"each chat message needs a role (system/user/assistant) and string "
                                       f"content, got {m!r}")
                check_text(m["content"], f"message {i}")
            return self._tokenize(lambda: self.tokenizer.chat_ids(prompt))
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if not ids:
            raise AdaspecError("the prompt is empty: give at least one token")
        if not all(isinstance(t, int) and 0 <= t < self.target.vocab_size for t in ids):
            raise AdaspecError(f"prompt token ids must be integers in [0, {self.target.vocab_size})")
        return ids

    def template_head(self) -> list[int]:
        """The token ids every chat prompt of this engine starts with: its chat template's opening
        (for Qwen2.5 the default system message and the user turn's header). It is the longest common
        prefix of three one-message chats whose texts start differently, so no token of it can
        belong to the user's text. [] without a tokenizer, with chat off, or when the template opens
        with nothing fixed."""
        if self.tokenizer is None or not self.chat:
            return []
        chats = [self.encode([{"role": "user", "content": text}]) for text in ("a", " 1", "\n!")]
        n = 0
        while all(len(c) > n for c in chats) and len({c[n] for c in chats}) == 1:
            n += 1
        return chats[0][:n]

    @staticmethod
    def _tokenize(run) -> list[int]:
        try:
            return list(run())
        except (ValueError, TypeError, UnicodeError) as e:  # what tokenizers raise on text they cannot take
            raise AdaspecError(f"the tokenizer cannot encode this text ({type(e).__name__}: {e}); send plain "
                               "UTF-8 text") from e

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise AdaspecError("this engine has no tokenizer: pass token ids instead of text")

    @property
    def default_method(self) -> str:
        """The method a request that names none runs: the draft head with prompt lookup beside it
        (`head-lookup`) when this engine has a head (the shipped head of the default target: the
        fastest lossless method measured on the q4k runtime, see HEAD_METHOD); else the best
        measured drafter-model method (DEFAULT_METHOD) when it has a profile, the uncalibrated
        adaptive `cmasd` with a drafter model and no profile, prompt lookup (`ngram`) without a
        drafter model."""
        if self._head is not None or self._head_file is not None:
            return HEAD_METHOD
        return self.default_method_without_head

    @property
    def default_method_without_head(self) -> str:
        """`default_method` as if no head were loaded: what a batched server runs for requests that
        name no method (the head keeps one cache, batching.py)."""
        if self.drafter is None:
            return "ngram"
        return DEFAULT_METHOD if self.profile is not None else "cmasd"

    def stop_strings(self, cfg: GenerationConfig) -> StopStrings | None:
        """The stop-string matcher of a request, None without stop strings."""
        if cfg.stop and self.tokenizer is None:
            raise AdaspecError("stop strings need a tokenizer: this engine has none")
        return StopStrings(self.tokenizer, cfg.stop) if cfg.stop else None

    def stream(self, prompt, *, method: str | None = None, chat: bool | None = None, **options) -> "Stream":
        """Generate incrementally: iterate the returned Stream for text (or id) chunks; then read .result.
        method=None: ``default_method``."""
        cfg = make_config(method or self.default_method, **options)
        ids = self.encode(prompt, chat=chat)
        stop = self.stop_strings(cfg)
        return Stream(speculative_generate(self.target, self.prepare(cfg), ids, cfg, stop=stop),
                      self.tokenizer, cfg.stop)

    def prepare(self, cfg: GenerationConfig, *, drafter: Drafter | None = None, warn: bool = True,
                view: ModelAdapter | None = None, batched: bool = False) -> Speculation:
        """A request's speculation, resolved once before the loop: its knobs (explicit > this
        engine's profile, for calibrated methods > built-in fallbacks), the drafter its method names
        (or ``drafter``, e.g. the benchmark's oracle) and its policies. Raises AdaspecError for a
        method this engine cannot run. warn=False: no warning for a calibrated method without a
        profile (a check before the run that warns itself). view: the drafter model's cache for this
        request; batched: the request decodes beside others (batching.py), so the head and the extra
        drafters, which keep one cache, are left out of pools and refused as a method's drafter."""
        spec = resolve_knobs(cfg.spec, self.profile, warn=warn)
        chosen = drafter if drafter is not None else self.drafter_for(spec, view=view, batched=batched)
        return prepare(spec, chosen, self.profile)

    def drafter_for(self, spec: SpecConfig, *, view: ModelAdapter | None = None, batched: bool = False) -> Drafter | None:
        """The drafter a resolved spec's method uses: none, the model, prompt lookup, the head, or a
        pool of lookup, the model and ``extra_drafters`` (the head among them)."""
        kind = spec.drafter_kind
        if kind == "none":
            return None
        ngram = NGramDrafter(self.target.vocab_size, max_ngram=spec.max_ngram, min_ngram=spec.min_ngram)  # stateless: one per request
        if kind == "ngram":
            return ngram
        if kind in ("head", "head-lookup"):
            if self._head is None and self._head_file is None:
                raise AdaspecError(f"method {spec.method!r} needs a draft head: load one (head=PATH, --head FILE; "
                                   "`adaspec train-head` trains one), or use another method")
            if batched:
                raise AdaspecError(f"method {spec.method!r}: the draft head keeps one cache, so it runs one request "
                                   "at a time (serve with --max-batch 1), or use another method")
            if kind == "head":
                return self.head
            return HeadOrLookup(self.head, ngram, self.target_ms())
        extras = [] if batched else self.extra_drafters
        if self.drafter is None and not (kind == "pool" and extras):
            raise AdaspecError(f"method {spec.method!r} needs a drafter model: load one, or use method='ar' "
                               "or method='ngram'")
        model = None if self.drafter is None else \
            ModelDrafter(view or self.drafter, context=spec.draft_context, lazy=batched)
        if kind == "model":
            return model
        return self._pool(ngram, model, extras, spec)

    def _pool(self, ngram: NGramDrafter, model: ModelDrafter | None, extras: list, spec: SpecConfig) -> DrafterPool:
        """The drafter pool on the profile's measured costs (ms), else on the fallbacks (units of one
        target forward). Extra drafters' relative costs are scaled by the one-token target forward."""
        cost = self.profile.cost if self.profile is not None else None
        target_ms = self.target_ms()
        unit = target_ms(1)
        models, priors = [(d, c * unit) for d, c in extras], {}
        if model is not None:
            measured = cost.drafter_ms_per_token if cost is not None else None
            models.insert(0, (model, measured if measured is not None else FALLBACK_DRAFTER * unit))
            rate = self.profile.fit.get("fit", {}).get("base_rate") if self.profile is not None else None
            if rate is not None:  # the pair's measured per-token acceptance is the best prior
                priors[model.name] = float(rate)
        return DrafterPool(models, ngram, target_ms, priors=priors, skip_entropy=spec.skip_entropy)

    def target_ms(self):
        """n -> T(n): the profile's measured target cost (ms), else the fallback (units of one forward).
        The drafter pool, `head-lookup` and the batch scheduler all price drafts on it."""
        cost = self.profile.cost if self.profile is not None else None
        return cost.target_cost if cost is not None else fallback_target_cost

    def generate(self, prompt, *, method: str | None = None, chat: bool | None = None, **options) -> Result:
        s = self.stream(prompt, method=method, chat=chat, **options)
        for _ in s:
            pass
        return s.result


class Stream:
    """Iterates text deltas (or token-id lists without a tokenizer); ``result`` is set at the end.

    Text is released only when it is final: an incomplete UTF-8 character at the end is held back,
    and so is a tail that could still grow into a stop string.
    """

    def __init__(self, gen, tokenizer: Tokenizer | None, stops: tuple[str, ...]):
        self._gen, self._tok, self._stops = gen, tokenizer, stops
        self._ids: list[int] = []
        self._sent = 0
        self.result: Result | None = None

    def __iter__(self) -> Iterator:
        try:
            while True:
                delta = self.add(next(self._gen))
                if delta:
                    yield delta
        except StopIteration as done:
            delta = self.end(done.value)
        if delta:
            yield delta

    def add(self, new: list[int]) -> str | list[int]:
        """The text (token ids without a tokenizer) that these newly committed ids make final."""
        self._ids += new
        return new if self._tok is None else self._delta(final=False)

    def end(self, result: Result) -> str | list[int]:
        """The generation is over: keep its Result, release what was held back."""
        self.result = result
        if self._tok is None:
            return []
        if result.text is None:
            result.text = self._tok.decode(result.token_ids)
        self._ids = result.token_ids
        return self._delta(final=True, text=result.text)

    def close(self) -> None:
        """Stop generating at the next step (e.g. the client went away)."""
        self._gen.close()

    def _delta(self, *, final: bool, text: str | None = None) -> str:
        text = self._tok.decode(self._ids) if text is None else text
        end = len(text)
        if not final:
            while end > self._sent and text[end - 1] == "\ufffd":
                end -= 1
            for s in self._stops:  # hold back a tail that may be the start of a stop string
                for j in range(min(len(s) - 1, end - self._sent), 0, -1):
                    if text[end - j:end] == s[:j]:
                        end -= j
                        break
        out = text[self._sent:end]
        self._sent = max(self._sent, end)
        return out


def load(target: str | ModelAdapter = DEFAULT_TARGET, drafter: str | ModelAdapter | None = DEFAULT_DRAFTER, *,
         dtype: torch.dtype = torch.float32, device: str = "cpu", quant: str | None = "auto",
         chat: bool = True, profile: Profile | str | Path | bool | None = None, drafter_runtime: str = "auto",
         target_runtime: str = "auto", early_exit: int | None = None, draft_vocab: int | str | Path | DraftVocab | None = None,
         head: str | Path | bool | None = None) -> Engine:
    """Load a target and drafter (preset names, local paths, hub ids, adapters) into an Engine.

    quant: "auto" (default: q4k for GGUF models on the CPU, int8 for other real ones), "none", "int8",
    "q4k" or "q4k-a16" (resolve_quant). With q4k-a16 the drafter runs q4k: its activations' precision
    changes only which drafts are proposed, never the output, and costs it twice the rows.
    profile: a calibration profile (or its JSON path) from `adaspec calibrate` for this very pair;
    None: the profile that ships for this pair and quantisation (the default pair in q4k and in int8), if any;
    False: none.
    drafter_runtime: "auto" (adaspec's runtime for quantised Llama-family drafters) or "hf" (see load_model).
    target_runtime: "auto" (adaspec's runtime, exact rows, for a q4k Llama-family target) or "hf".
    draft_vocab: prune the drafter's vocabulary (load_model; drafters/vocab.py).
    early_exit: also give the drafter pool (``multi-draft``) the target's first ``early_exit`` layers
    as a drafter (docs/method.md, "Early-exit drafter").
    head: a draft head file for this target (drafters/head.py); None: the head shipped for the
    target, if any; False: none.
    """
    quant = resolve_quant(quant, target, device=device, dtype=dtype)
    shipped = shipped_profile(target, drafter, quant) if profile is None else None
    t_model, t_tok = load_model(target, dtype=dtype, device=device, quant=quant, target_runtime=target_runtime)
    d_model, d_tok = (None, None)
    if drafter is not None:
        d_quant = "q4k" if quant == "q4k-a16" else quant
        d_model, d_tok = load_model(drafter, dtype=dtype, device=device, quant=d_quant, role="drafter",
                                    drafter_runtime=drafter_runtime, draft_vocab=draft_vocab)
    engine = Engine(t_model, d_model, t_tok, drafter_tokenizer=d_tok, chat=chat,
                    target_name=target if isinstance(target, str) else None,
                    drafter_name=drafter if isinstance(drafter, str) else None,
                    profile=profile if profile is not False else None)
    # The drafter's tokenizer was only needed for the check above (the engine tokenizes with the
    # target's): dropped, and its heap pages handed back (about 0.1 GB for the default pair).
    del d_tok
    if shipped is not None:
        engine.use_profile(shipped, shipped=True)
    if early_exit is not None:
        engine.extra_drafters.append(early_exit_drafter(t_model, early_exit))
    head_path = shipped_head(target) if head is None else (None if head is False else head)
    if head_path is not None:
        engine.use_head(head_path)
    release_freed_memory()
    return engine


def generate(prompt, *, target: str | ModelAdapter | Engine = DEFAULT_TARGET,
             drafter: str | ModelAdapter | None = DEFAULT_DRAFTER, method: str | None = None,
             tokenizer: Tokenizer | None = None, **options) -> Result:
    """One-call generation. ``target`` may be an Engine, a model adapter, or a name/path to load."""
    if isinstance(target, Engine):
        engine = target
    elif isinstance(target, str) or isinstance(drafter, str):
        engine = load(target, drafter)
    else:
        engine = Engine(target, drafter, tokenizer)
    return engine.generate(prompt, method=method, **options)
