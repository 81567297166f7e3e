"""Where q4k's greedy disagreement with the float32 model comes from.

    python experiments/q4k_agreement.py

Three variants of the 1.5B, each compared with float32 on 6 prompts x 64 greedy tokens, as
experiments/q4k_compare.py measures it:
- q4k as it runs;
- the same, with its int8 output head replaced by the float32 head (the GGUF's Q6_K values,
  de-quantised);
- the same again, with every int8 linear layer (the Q6_K `ffn_down` and `attn_v` layers) in float32
  as well.

The Q4_K layers, and the int8 rounding of their activations, stay in all three. docs/runtime.md
(session 10) reports the results.
"""

import copy
import importlib.util
from pathlib import Path

import torch

from adaspec.api import load_model, make_config
from adaspec.decode import generate_ids
from adaspec.models.fast import FastDecoder
from adaspec.models.quant import Int8Linear

MODEL = "qwen2.5-coder-1.5b"
VARIANTS = {"q4k": (), "q4k + float32 head": ("lm_head",),
            "q4k + float32 head, ffn_down and attn_v": ("lm_head", "down_proj", "v_proj")}


def _compare_module():
    spec = importlib.util.spec_from_file_location("q4k_compare", Path(__file__).with_name("q4k_compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant(float_model, float_names: tuple[str, ...]) -> FastDecoder:
    """The q4k model with the int8 layers named by these suffixes taken from the float32 model."""
    model = load_model(MODEL, quant="q4k")[0].model
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear) and name.endswith(float_names):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, copy.deepcopy(float_model.get_submodule(name)))
    return FastDecoder(model, MODEL, exact_rows=True)


def main() -> None:
    qc = _compare_module()
    torch.set_num_threads(2)
    f32, tok = load_model(MODEL)
    prompts = [tok.chat_ids([{"role": "user", "content": t}]) for t in qc.PROMPTS[:6]]
    cfg = make_config("ar", max_new_tokens=64, ignore_eos=True)
    ref = [generate_ids(f32, None, ids, cfg).token_ids for ids in prompts]
    ref_top = []
    for x, r in zip(prompts, ref):
        f32.reset()
        ref_top.append(f32.extend(torch.tensor(x + r[:-1]))[len(x) - 1:].argmax(-1))
    print("| model | greedy agreement with float32 | common prefixes | top-1 on float32's continuation |\n"
          "|---|---|---|---|")
    for label, names in VARIANTS.items():
        adapter = variant(f32.model, names)
        out = [generate_ids(adapter, None, x, cfg).token_ids for x in prompts]
        share, prefixes = qc.agreement(ref, out)
        forced = qc.forced_agreement(adapter, prompts, ref, ref_top)
        print(f"| {label} | {share:.1%} | {prefixes} | {forced:.1%} |", flush=True)


if __name__ == "__main__":
    main()
