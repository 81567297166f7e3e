"""Int8 quantisation of a model adapter for CPU decoding.

`quantize_adapter(adapter, "int8")` replaces every `nn.Linear` of the adapter's `.model` by an
`Int8Linear`: weights int8 with one scale per output channel, activations quantised on the fly to
unsigned int8 with one range per token (row), and the matmul in fbgemm's int8 kernel. Decoding on
CPU is bound by reading weights, so int8 weights make a forward several times faster, and the cost
of a forward grows much more slowly with the number of new tokens than in float32 -- which is what
makes verifying k drafts cheap (figures in docs/results/quant-cpu.md).

Why one activation range per token, not the per-tensor dynamic range of torch's
`quantize_dynamic`: a per-tensor range spans *all* rows of a forward, so a token's logits depend
on which other tokens share its forward. The target then scores a token differently when it
verifies a draft of k+1 positions than when it decodes one token at a time, and greedy speculative
output stops equalling greedy autoregressive output (on the tiny model it diverged within a few
tokens for most prompts). With a range per row every row is quantised the same way whatever the
batch, and int8 x int8 products are summed exactly in int32, so a row's result does not depend on
the other rows at all: the quantised model is exactly as batch-invariant as its float32 parts
(attention, norms) are. A per-row range is also more accurate: one outlier token no longer coarsens
every other token of a forward.

That is not yet enough: rounding to int8 is discontinuous, so the ~1e-7 differences that fused
attention kernels make between a one-token and a (k+1)-token forward flip some roundings and grow
layer by layer, to logit differences of about 1 on Qwen2.5-Coder-0.5B/1.5B; greedy speculative output
then left the int8 target's own greedy output on 2 of 3 prompts within 64 tokens. So a quantised
transformers model also gets row-by-row attention for short forwards (models/invariant.py), which
makes a row's logits bit-identical however the tokens are split into forwards.

Each row x is mapped affinely onto [0, L]: x' = (x - lo) / (hi - lo), so x W^T = (hi - lo) x' W^T
+ lo * rowsum(W). L = 255 on CPUs with AVX512-VNNI; elsewhere fbgemm adds pairs of uint8 x int8
products in int16, which can saturate, so L = 127 there (torch's own x86 dynamic quantisation
reduces the range for the same reason).

Measured on Qwen2.5-Coder-1.5B (KL divergence from float32 over a held 300-token paragraph, and
greedy agreement over 3 prompts x 32 tokens): per-tensor dynamic range (quantize_dynamic,
per-channel weights) KL 0.48, 67% identical tokens; per-row symmetric 7 bits 0.066, 79%; per-row
affine 7 bits 0.052; per-row affine 8 bits 0.015, 100%; the same with the LM head in float32
0.013, 100%.

Why per-channel weight scales: with one scale per weight tensor the Qwen2.5 models diverged from
float32 at the first generated token; one scale per output row keeps greedy output close.

Why the LM head is quantised too: it is the largest single matrix of a small model with a big
vocabulary (151936 x 1536 in Qwen2.5-Coder-1.5B, about 15% of the weights read per token), and
keeping it in float32 bought little (KL 0.013 instead of 0.015, same greedy output; figures in
docs/results/quant-cpu.md). `lm_head=False` keeps it in float32. With tied embeddings only the
head gets an int8 copy; the input embedding stays float32.

Kernel: `torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32` (quantise the input
with given parameters, int8 GEMM, float32 out) on weights packed for fbgemm, the kernels behind
`quantize_dynamic`. torch 2.13 deprecates torch.ao.quantization in favour of torchao, but torchao
0.18's int8 configs run eagerly on CPU through generic ops, 10-15x slower than float32 here.
Weights are packed under the fbgemm engine explicitly: on CPUs with VNNI torch's default x86
engine may pack them for oneDNN, which lacks this op.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import functools
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from adaspec.config import AdaspecError
from adaspec.models.base import ModelAdapter

MODES = ("int8", "q4k")


@functools.cache
def activation_levels() -> int:
    """Top of the activation range: 255 where fbgemm runs VNNI kernels (no int16 saturation), else 127."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 127
    return 255 if " avx512_vnni" in flags else 127


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 (per-output-channel scales) and x uint8 per row, on fbgemm."""

    def __init__(self, packed, rowsum: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int, levels: int):
        super().__init__()
        self.in_features, self.out_features, self.levels = in_features, out_features, levels
        self._held = packed  # fbgemm's packed int8 weight (a torch ScriptObject), without the bias
        self._part_of: tuple[Int8Linear, int] | None = None  # (fused layer, first row) once fused: fuse_int8
        self.register_buffer("rowsum", rowsum)  # (out,) sum over k of the dequantised W[j, k]
        self.register_buffer("bias", bias)  # (out,) or None

    @property
    def _packed(self):
        """The packed weight; a layer fused into another (fuse_int8) gave its copy up and gets its rows
        back from the fused layer at its first own call (the same integers and scales)."""
        if self._held is None:
            fused, start = self._part_of
            w = fused.weight_int8()
            rows = slice(start, start + self.out_features)
            with _quant_quiet():
                self._held = _prepack(torch._make_per_channel_quantized_tensor(
                    w.int_repr()[rows].contiguous(), w.q_per_channel_scales()[rows].contiguous(),
                    w.q_per_channel_zero_points()[rows].contiguous(), 0))
        return self._held

    @classmethod
    def from_float(cls, linear: nn.Linear, levels: int | None = None) -> "Int8Linear":
        w = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        with _quant_quiet():
            from torch.ao.quantization.observer import default_per_channel_weight_observer

            observer = default_per_channel_weight_observer()  # symmetric, one scale per output row
            observer(w)
            scale, zero = observer.calculate_qparams()
            qweight = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        return cls(_prepack(qweight), _rowsum(qweight), bias, linear.in_features, linear.out_features,
                   levels or activation_levels())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)  # (..., 1) each: the row's own range
        span = (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            (x - lo) / span, 1.0 / self.levels, 0, self._packed)  # (..., out): x' W^T, x' in [0, 1]
        y = torch.addcmul(lo * self.rowsum, y, span)  # x W^T = span x' W^T + lo rowsum(W)
        return y if self.bias is None else y.add_(self.bias)

    def weight_int8(self) -> torch.Tensor:
        """The quantised weight (out, in) as a torch.qint8 per-channel tensor."""
        return self._packed.unpack()[0]

    def __deepcopy__(self, memo):
        # repack explicitly: unpickling a packed weight would pick the current engine's packing
        bias = None if self.bias is None else self.bias.clone()
        return type(self)(_prepack(self.weight_int8()), self.rowsum.clone(), bias, self.in_features,
                          self.out_features, self.levels)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation_levels={self.levels}")


def fuse_int8(linears: list[Int8Linear]) -> Int8Linear:
    """One Int8Linear computing the outputs of several that read the same input (q, k, v; gate, up),
    concatenated. Bit-identical to calling them one by one: each output is an exact int32 sum scaled
    per output channel, and every layer quantises the shared input row the same way. One call
    instead of several saves the per-call work (the input's range, quantisation, kernel dispatch).

    The layers give up their own packed copies (fbgemm's packed weights cannot be sliced), so fusing
    costs no memory: a layer called on its own afterwards (transformers' forward, as the `hf-*`
    baselines run it) rebuilds its copy from the fused rows once (`_packed`). Fusing the same layers
    again returns the same fused layer."""
    if len({m.in_features for m in linears}) != 1 or len({m.levels for m in linears}) != 1:
        raise ValueError("fused layers must share their input width and activation levels")
    done = linears[0]._part_of
    if done is not None:
        starts = [sum(m.out_features for m in linears[:i]) for i in range(len(linears))]
        if [m._part_of for m in linears] == [(done[0], start) for start in starts] \
                and done[0].out_features == sum(m.out_features for m in linears):
            return done[0]
    weights = [m.weight_int8() for m in linears]
    ints = torch.cat([w.int_repr() for w in weights])
    scales = torch.cat([w.q_per_channel_scales() for w in weights])
    zeros = torch.cat([w.q_per_channel_zero_points() for w in weights])
    qweight = torch._make_per_channel_quantized_tensor(ints, scales, zeros, 0)
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat([
        b if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, linears)])
    fused = Int8Linear(_prepack(qweight), torch.cat([m.rowsum for m in linears]), bias, linears[0].in_features,
                       sum(m.out_features for m in linears), linears[0].levels)
    start = 0
    for m in linears:
        m._held, m._part_of = None, (fused, start)
        start += m.out_features
    return fused


class DynamicInt8Linear(nn.Module):
    """The same int8 weights in one fbgemm call that also quantises the input, with one range for the
    whole input (torch's dynamic quantisation). About 30 us less per call than Int8Linear's per-row
    range, but a row's result then depends on the other rows of its forward: fit for drafters, whose
    numbers only steer proposals, never for a target (see the module docstring)."""

    def __init__(self, linear: Int8Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed, self.bias = linear._packed, linear.bias
        self._reduce_range = linear.levels != 255  # no VNNI: keep int16 pair sums from saturating

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed, self._reduce_range)
        return y if self.bias is None else y.add_(self.bias)


def quantize_adapter(adapter: ModelAdapter, mode: str, *, lm_head: bool = True, copy: bool = False,
                     gguf: str | None = None, pack_cache=None) -> ModelAdapter:
    """Quantise the adapter's model (its `.model` attribute) and return the adapter, cache emptied.

    mode: "int8" (CPU only, float32 models only; see the module docstring), or "q4k": the linear
        layers whose weights are Q4_K in the GGUF file `gguf` (the file the model was converted
        from) compute with those 4-bit weights (models/q4k.py), those whose weights are Q6_K (the
        output head included) with their 6-bit weights (models/q6k.py), the Q5_0 ones with their 5-bit
        weights (models/q5_0.py), every other one is int8; `pack_cache`
        (a q4k.PackCache) keeps the packed layers on disk for the next load.
    lm_head: also quantise the output head (the Linear producing the vocab_size logits).
    copy: quantise a deep copy and leave `adapter` untouched (costs the float model's memory once
    more); by default the model is quantised in place and its float32 linear weights are freed.
    """
    if mode not in MODES:
        raise AdaspecError(f"unknown quantisation mode {mode!r}; known modes: {', '.join(MODES)}")
    model = getattr(adapter, "model", None)
    if not isinstance(model, nn.Module):
        raise AdaspecError(f"cannot quantise {getattr(adapter, 'name', adapter)!r}: its adapter has no "
                           f"torch `.model` to quantise")
    device = torch.device(adapter.device)
    if device.type != "cpu":
        raise AdaspecError(f"int8 is a CPU path; on GPU use --dtype bfloat16 ({adapter.name} is on {device})")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise AdaspecError(f"int8 needs torch's fbgemm kernels (x86 CPUs); this torch has only "
                           f"{', '.join(torch.backends.quantized.supported_engines)}: use float32")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise AdaspecError(f"int8 quantisation needs a float32 model; {adapter.name} has {found} weights. "
                           f"Load it with dtype=torch.float32 (--dtype float32)")
    if copy:
        adapter = _copy.deepcopy(adapter)
        model = adapter.model
    if mode == "q4k":
        if gguf is None:
            raise AdaspecError(f"q4k computes with a GGUF file's own 4-bit weights, and {adapter.name} was not loaded "
                               "from one: use a preset or a .gguf file, or --quant int8")
        from adaspec.models.q4k import apply_gguf

        apply_gguf(model, gguf, pack_cache)
    skip = set() if lm_head else set(_head_names(model, adapter.vocab_size))
    replace_linears(model, Int8Linear.from_float, skip=skip)
    _use_row_attention(model)
    adapter.reset()  # any cached keys and values came from the float weights
    return adapter


def replace_linears(model: nn.Module, make, *, skip: set[str] = frozenset()) -> None:
    """Replace every nn.Linear of `model` (exact type: subclasses may have callers that read their
    .weight) whose name is not in `skip` by make(linear). By name, not by module: each float Linear
    is freed as soon as it is swapped out."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(model.get_submodule(name)))


def is_quantized(adapter: ModelAdapter) -> bool:
    """True when the adapter's model holds at least one quantised layer: Int8Linear, or the q4k
    mode's Q4KLinear and Q6KLinear (a q4k model may hold no int8 layer at all)."""
    from adaspec.models.extension import BlockLinear

    model = getattr(adapter, "model", None)
    return isinstance(model, nn.Module) and any(isinstance(m, Int8Linear | BlockLinear) for m in model.modules())


def _use_row_attention(model: nn.Module) -> bool:
    """Give a transformers model with SDPA attention row-wise attention; False if it cannot."""
    from adaspec.models import invariant

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", invariant.NAME):
        return False
    try:
        invariant.make_batch_invariant(model)
    except ImportError:  # transformers too old for pluggable attention: fused kernel, not bit-exact
        return False
    return True


def _head_names(model: nn.Module, vocab_size: int) -> list[str]:
    """Names of the output head: transformers' get_output_embeddings(), else Linears of width V."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return [name for name, m in model.named_modules() if m is head]
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == vocab_size]


@contextlib.contextmanager
def _quant_quiet():
    """torch.ao.quantization warns on import and on quantised-tensor creation that it is moving to
    torchao; the fbgemm kernels used here are still torch's own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        yield


def _rowsum(qweight: torch.Tensor) -> torch.Tensor:
    """(out,) row sums of the dequantised weight: exact integer sums times each row's scale."""
    # exact: |sum| <= 127 * in_features < 2^31; 4096 rows at a time (the sum widens its input to int32:
    # 0.4 GB at once for the draft head's 32k output rows)
    ints = torch.cat([rows.sum(1, dtype=torch.int32) for rows in qweight.int_repr().split(4096)]).double()
    return (ints * qweight.q_per_channel_scales().double()).float()


def _prepack(qweight: torch.Tensor):
    """Pack an int8 weight for fbgemm, whatever torch's current quantised engine is."""
    previous = torch.backends.quantized.engine
    try:
        with _quant_quiet():
            torch.backends.quantized.engine = "fbgemm"
            return torch.ops.quantized.linear_prepack(qweight, None)
    finally:
        torch.backends.quantized.engine = previous
