"""Where q4k's greedy disagreement with the float32 model comes from.

    python experiments/q4k_agreement.py [--spec-bench N] [--llamacpp] [--variants LABEL ...]

Variants of the 1.5B, each compared with float32 on 6 prompts x 64 greedy tokens, as
experiments/q4k_compare.py measures it:
- q4k as it runs (since session 11 the file's Q6_K layers, the output head and half of `ffn_down`
  and `attn_v`, compute with their own 6-bit values, models/q6k.py);
- the same with those layers as int8 with per-channel scales (q4k as it ran until session 10);
- the same with the int8 output head replaced by the float32 head (the GGUF's Q6_K values,
  de-quantised);
- the same again, with every Q6_K layer in float32 (float activations too);
- q4k-a16: q4k's layers with their activations carried at about 15 bits (two int8 parts,
  models/extension.ACTS) instead of rounded to int8 (since session 16).

The Q4_K layers stay in all of them, and the int8 rounding of their activations in all but q4k-a16. --llamacpp adds
llama.cpp on the same GGUF file (the `anchors` extra), which rounds activations too (Q8_K).
--spec-bench N adds the first turns of N Spec-Bench prompts per subtask to the 6 prompts: one
early near-tie sends a whole free-running answer elsewhere, so 6 prompts make a noisy share.
docs/runtime.md (sessions 10 and 11) reports the results.
"""

import argparse
import copy
import importlib.util
from pathlib import Path

import torch

from adaspec.api import load_model, make_config
from adaspec.decode import generate_ids
from adaspec.models.fast import FastDecoder
from adaspec.models.q6k import Q6KLinear
from adaspec.models.quant import Int8Linear

MODEL = "qwen2.5-coder-1.5b"
Q6K = ("lm_head", "down_proj", "v_proj")
VARIANTS = {"q4k (Q6_K layers as Q6_K)": ((), (), "q4k"), "q4k, Q6_K layers as int8 (session 10)": (Q6K, (), "q4k"),
            "q4k, Q6_K layers as int8, float32 head": (Q6K[1:], Q6K[:1], "q4k"),
            "q4k, Q6_K layers float32": ((), Q6K, "q4k"), "q4k-a16": ((), (), "q4k-a16")}


def _compare_module():
    spec = importlib.util.spec_from_file_location("q4k_compare", Path(__file__).with_name("q4k_compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant(float_model, int8_names: tuple[str, ...], float_names: tuple[str, ...], quant: str) -> FastDecoder:
    """The model in this quant with its Q6_K layers named by these suffixes made int8 from, or taken
    as, the float32 model's layers."""
    model = load_model(MODEL, quant=quant)[0].model
    for name, module in list(model.named_modules()):
        if isinstance(module, Q6KLinear) and name.endswith(int8_names + float_names):
            parent, _, child = name.rpartition(".")
            layer = copy.deepcopy(float_model.get_submodule(name))
            if name.endswith(int8_names):
                layer = Int8Linear.from_float(layer)
            setattr(model.get_submodule(parent), child, layer)
    return FastDecoder(model, MODEL, exact_rows=True)


def llamacpp(prompts: list[list[int]], ref: list[list[int]], ref_top: list[torch.Tensor]):
    """llama.cpp's greedy answers (as many tokens as float32's) and its top-1 agreement on float32's
    continuations, each forward one row as llama-cpp-python decodes."""
    from adaspec.api import _gguf_file
    from adaspec.bench import anchors

    model = anchors._model(_gguf_file(MODEL), 2, "target")
    out, same = [], 0
    for x, r, top in zip(prompts, ref, ref_top):
        model.reset()
        logits, answer = model.decode(x, 0, logits="last"), []
        for _ in r:
            answer.append(int(logits[-1].argmax()))
            logits = model.decode(answer[-1:], len(x) + len(answer) - 1, logits="last")
        out.append(answer)
        model.reset()
        forced = model.decode(x + r[:-1], 0, logits="all")[len(x) - 1:]
        same += int((torch.from_numpy(forced.argmax(-1)) == top).sum())
    return out, same / sum(len(r) for r in ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec-bench", type=int, default=0, help="Spec-Bench prompts per subtask to add")
    parser.add_argument("--llamacpp", action="store_true", help="add llama.cpp (needs the anchors extra)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run (default: all)")
    a = parser.parse_args()
    qc = _compare_module()
    torch.set_num_threads(2)
    f32, tok = load_model(MODEL)
    prompts = [tok.chat_ids([{"role": "user", "content": t}]) for t in qc.PROMPTS[:6]]
    if a.spec_bench:
        from adaspec.bench.datasets import load_spec_bench
        from adaspec.bench.runner import prompt_text

        prompts += [tok.chat_ids([{"role": "user", "content": prompt_text(r)}])
                    for r in load_spec_bench(limit_per_subtask=a.spec_bench)]
    print(f"{len(prompts)} prompts x 64 greedy tokens\n")
    cfg = make_config("ar", max_new_tokens=64, ignore_eos=True)
    ref = [generate_ids(f32, None, ids, cfg).token_ids for ids in prompts]
    ref_top = []
    for x, r in zip(prompts, ref):
        f32.reset()
        ref_top.append(f32.extend(torch.tensor(x + r[:-1]))[len(x) - 1:].argmax(-1))
    print("| model | greedy agreement with float32 | common prefixes | top-1 on float32's continuation |\n"
          "|---|---|---|---|")
    for label in a.variants:
        int8_names, float_names, quant = VARIANTS[label]
        adapter = variant(f32.model, int8_names, float_names, quant)
        out = [generate_ids(adapter, None, x, cfg).token_ids for x in prompts]
        share, prefixes = qc.agreement(ref, out)
        forced = qc.forced_agreement(adapter, prompts, ref, ref_top)
        print(f"| {label} | {share:.1%} | {prefixes} | {forced:.1%} |", flush=True)
    if a.llamacpp:
        out, forced = llamacpp(prompts, ref, ref_top)
        share, prefixes = qc.agreement(ref, out)
        print(f"| llama.cpp (llama-cpp-python) | {share:.1%} | {prefixes} | {forced:.1%} |", flush=True)


if __name__ == "__main__":
    main()
