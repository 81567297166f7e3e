"""Q4_K, Q6_K and Q5_0 weights computed as they are stored (models/q4k.py, q6k.py, q5_0.py): the unpacking
reproduces ggml's dequantisation exactly, the packed tiles give back the file's values, the kernels
are batch-invariant (a k-row forward is bit-identical to k one-row forwards), the same on the
portable loop, and close to float, and a q4k target keeps greedy speculation identical to its own
greedy decoding."""

import numpy as np
import pytest
import torch

from adaspec.config import AdaspecError
from adaspec.models import q4k, q5_0, q6k
from adaspec.models.registry import is_pulled, path

QWEN = "qwen2.5-coder-0.5b"
needs_qwen = pytest.mark.skipif(not is_pulled(QWEN), reason=f"{QWEN} is not pulled: run `adaspec models pull {QWEN}`")


def random_weights(n: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"qs": torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8),
            "sc": torch.randint(0, 64, (n, k // 32), generator=g, dtype=torch.uint8),
            "mn": torch.randint(0, 64, (n, k // 32), generator=g, dtype=torch.uint8),
            "d": torch.rand(n, k // 256, generator=g) * 0.01, "dm": torch.rand(n, k // 256, generator=g) * 0.01}


def random_q6k(n: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randint(0, 64, (n, k), generator=g, dtype=torch.uint8),
            "sc": torch.randint(-128, 128, (n, k // 16), generator=g, dtype=torch.int8),
            "d": torch.rand(n, k // 256, generator=g) * 0.001}


def random_q5_0(n: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randint(0, 32, (n, k), generator=g, dtype=torch.uint8),
            "d": (torch.rand(n, k // 32, generator=g) * 0.01 - 0.005).to(torch.float16)}


def random_layer(fmt: str, n: int, k: int, seed: int = 0, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    """A Q4_K, Q6_K or Q5_0 layer of random weights, and its weights de-quantised."""
    if fmt == "q4k":
        w = random_weights(n, k, seed)
        return q4k.Q4KLinear(w, **kwargs), q4k.dequantize(w)
    if fmt == "q5_0":
        w = random_q5_0(n, k, seed)
        return q5_0.Q50Linear(q5_0.pack_tiles(w), **kwargs), q5_0.dequantize(w)
    w = random_q6k(n, k, seed)
    return q6k.Q6KLinear(q6k.pack_tiles(w), **kwargs), q6k.dequantize(w)


@pytest.mark.parametrize("fmt,k", [("q4k", 512), ("q6k", 512), ("q5_0", 544)])  # Q5_0: 17 blocks of 32
@pytest.mark.parametrize("kernel_name", ["auto", "portable"])
def test_kernel_rows_are_batch_invariant_and_close_to_float(fmt, k, kernel_name):
    lin, weight = random_layer(fmt, 80, k, kernel_name=kernel_name)  # 5 tiles: one row takes 4, then 1
    x = torch.randn(21, k, generator=torch.Generator().manual_seed(1))  # groups of 6 rows and a last one of 3
    y = lin(x)
    singles = torch.cat([lin(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.equal(y, singles)
    assert torch.equal(lin(x[3:8]), y[3:8])
    ref = x @ weight.T
    assert float((y - ref).norm() / ref.norm()) < 0.02  # int8 activations, per 256- (Q5_0: 32-) block scale


@pytest.mark.parametrize("fmt", ["q4k", "q6k", "q5_0"])
def test_vectorised_and_portable_kernels_agree_bit_for_bit(fmt):
    bias = torch.randn(48, generator=torch.Generator().manual_seed(5))
    fast = random_layer(fmt, 48, 768, seed=2, bias=bias)[0]
    slow = random_layer(fmt, 48, 768, seed=2, bias=bias, kernel_name="portable")[0]
    x = torch.randn(13, 768, generator=torch.Generator().manual_seed(3))  # row groups of 6, 6 and 1
    assert torch.equal(fast(x), slow(x))  # the same integers, the same fmas per block in the same order


@pytest.mark.parametrize("fmt", ["q4k", "q6k", "q5_0"])
def test_fused_layers_give_each_layer_its_own_outputs_bit_for_bit(fmt):
    g = torch.Generator().manual_seed(4)
    parts = []
    for n, bias in ((64, torch.randn(64, generator=g)), (32, None), (16, torch.randn(16, generator=g))):
        layer = random_layer(fmt, n, 512, seed=n)[0]
        layer.bias = bias
        parts.append(layer)
    alone = [m(torch.ones(1, 512)) for m in parts]
    fused = q4k.fuse_blocks(parts)
    x = torch.randn(3, 512, generator=g)
    assert torch.equal(fused(x), torch.cat([m(x) for m in parts], dim=-1))
    assert all(torch.equal(m(torch.ones(1, 512)), y) for m, y in zip(parts, alone))  # each keeps working
    with pytest.raises(ValueError, match="same input"):
        q4k.fuse_blocks([parts[0], random_layer(fmt, 16, 256)[0]])
    with pytest.raises(ValueError, match="one kind"):
        q4k.fuse_blocks([parts[0], random_layer("q6k" if fmt != "q6k" else "q4k", 16, 512)[0]])


@pytest.mark.parametrize("fmt,k", [("q4k", 512), ("q6k", 512), ("q5_0", 544)])
@pytest.mark.parametrize("kernel_name", ["auto", "portable"])
def test_a16_activations_stay_batch_invariant_and_come_much_closer_to_float(fmt, k, kernel_name):
    lin, weight = random_layer(fmt, 80, k, kernel_name=kernel_name)
    x = torch.randn(21, k, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 10, k)  # uneven scales
    ref = x.double() @ weight.double().T
    a8 = float((lin(x).double() - ref).norm() / ref.norm())
    lin.acts = "a16"
    y = lin(x)
    assert torch.equal(y, torch.cat([lin(x[i:i + 1]) for i in range(x.shape[0])]))
    assert torch.equal(lin(x[3:8]), y[3:8])
    a16 = float((y.double() - ref).norm() / ref.norm())
    assert a16 < 1e-4 and a16 < a8 / 50  # measured: a8 5e-3 to 7e-3, a16 2e-5 to 3e-5


@pytest.mark.parametrize("fmt", ["q4k", "q6k", "q5_0"])
def test_a16_vectorised_and_portable_kernels_agree_bit_for_bit(fmt):
    fast = random_layer(fmt, 48, 768, seed=2)[0]
    slow = random_layer(fmt, 48, 768, seed=2, kernel_name="portable")[0]
    fast.acts = slow.acts = "a16"
    x = torch.randn(7, 768, generator=torch.Generator().manual_seed(3))  # 14 kernel rows: groups 6, 6, 2
    assert torch.equal(fast(x), slow(x))


@pytest.mark.parametrize("block", [256, 32])
def test_split_activations_gives_each_row_and_what_its_int8_rounding_left_out(block):
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(6)) * 3
    x[1, :block] = 0  # an empty block has scale 0 and leaves nothing out
    parts = q4k.kernel().split_activations(x, block, "auto")
    assert parts.shape == (6, 512) and torch.equal(parts[0::2], x)
    assert torch.equal(parts, q4k.kernel().split_activations(x, block, "portable"))
    b = x.reshape(3, -1, block)
    d = b.abs().amax(-1, keepdim=True) / 127
    q = torch.round(b / torch.where(d > 0, d, 1)).clamp(-127, 127)  # the kernels' int8 rounding
    rest = parts[1::2].reshape(3, -1, block)
    assert torch.allclose(rest, b - q * d, atol=1e-6)
    assert bool((rest.abs() <= d / 2 * 1.0001 + 1e-7).all())  # at most half a rounding step
    assert not rest[1, 0].any()
    with pytest.raises(RuntimeError, match="256 or 32"):
        q4k.kernel().split_activations(x, 64, "auto")


def test_set_activations_reaches_fused_layers_and_refuses_unknown_forms():
    from adaspec.models.extension import set_activations

    parts = [random_layer("q4k", n, 512, seed=n)[0] for n in (32, 16)]
    model = torch.nn.ModuleList(parts)
    fused = q4k.fuse_blocks(parts)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(7))
    before = fused(x)
    assert set_activations(model, "a16") == 2 and fused.acts == "a16"
    after = fused(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, torch.cat([m(x) for m in parts], dim=-1))
    with pytest.raises(ValueError, match="activation form"):
        q4k.fuse_blocks([parts[0], random_layer("q4k", 16, 512, seed=3)[0]])
    with pytest.raises(ValueError, match="unknown activation form 'a4'; choose one of a8, a16"):
        set_activations(model, "a4")


def test_the_cpu_flags_and_the_built_kernel_agree_on_the_vectorised_path():
    assert q4k.vectorised_here() == q4k.kernel().has_vnni()  # what --quant auto reads, without a build


def test_tiles_need_sixteen_outputs_and_256_inputs():
    with pytest.raises(ValueError, match="multiple of 16"):
        q4k.pack_tiles(random_weights(8, 256))
    with pytest.raises(ValueError, match="Q4_K rows"):
        q4k.unpack_q4k(np.zeros((4, 100), np.uint8))


@needs_qwen
def test_unpacking_reproduces_ggml_dequantisation_exactly():
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path(QWEN)))
    t = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q4_K and t.name.startswith("blk."))
    raw = np.asarray(t.data)
    ours = q4k.dequantize(q4k.unpack_q4k(raw))
    assert torch.equal(ours, torch.from_numpy(dequantize(raw, t.tensor_type).astype(np.float32)))


@needs_qwen
def test_q4k_target_is_batch_invariant_and_speculation_stays_lossless():
    from adaspec.api import Engine, load_model
    from adaspec.models.fast import FastDecoder

    torch.set_num_threads(2)
    target, tok = load_model(QWEN, quant="q4k")
    assert isinstance(target, FastDecoder) and target.exact_rows  # adaspec's runtime by default
    assert sum(isinstance(m, q4k.Q4KLinear) for m in target.model.modules()) == 12  # its Q4_K ffn_down layers
    ids = torch.randint(0, target.vocab_size, (60,), generator=torch.Generator().manual_seed(0))
    for adapter in (target, load_model(QWEN, quant="q4k", target_runtime="hf")[0]):  # both runtimes
        adapter.reset()
        adapter.extend(ids[:50])
        many = adapter.extend(ids[50:55])
        adapter.rollback(50)
        assert torch.equal(many, torch.cat([adapter.extend(ids[50 + i:51 + i]) for i in range(5)]))
    drafter, _ = load_model(QWEN, quant="int8", role="drafter")  # another precision: drafts are sometimes rejected
    engine = Engine(target, drafter, tok)
    for prompt in ("Write a Python function that reverses a string.", "What is a hash map?"):
        ar = engine.generate(prompt, method="ar", max_new_tokens=32)
        sp = engine.generate(prompt, method="fixed", k=4, max_new_tokens=32)
        assert sp.token_ids == ar.token_ids, prompt


def test_q4k_needs_a_gguf_model():
    from adaspec.api import load_model

    with pytest.raises(AdaspecError, match="GGUF"):
        load_model("tiny", quant="q4k")


@needs_qwen
def test_packed_layers_are_kept_reused_bit_for_bit_and_refused_when_damaged(tmp_path, monkeypatch):
    from adaspec.api import load_model
    from adaspec.models.registry import PRESETS

    gguf = path(QWEN)
    cache = q4k.PackCache(tmp_path, PRESETS[QWEN].sha256, "run the fix")
    ids = torch.arange(100, 130)

    def logits():
        model = load_model(QWEN)[0].model
        names = q4k.apply_gguf(model, gguf, cache)
        with torch.inference_mode():
            return names, model(ids[None]).logits[0]

    names, first = logits()
    assert len(names) == 156 and (cache.folder / q4k.PACKED_FILE).is_file()  # ffn_down: 12 Q4_K, 12 Q6_K; 132 Q5_0
    monkeypatch.setattr(q4k, "_from_gguf", lambda *a: pytest.fail("the kept copy was not used"))
    again, second = logits()
    assert again == sorted(names) and torch.equal(first, second)
    monkeypatch.undo()

    packed = cache.folder / q4k.PACKED_FILE
    data = bytearray(packed.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte of the last layer's weights
    packed.write_bytes(bytes(data))
    with pytest.raises(AdaspecError, match=r"packed Q4_K copy .* is damaged \(q4k.safetensors was changed.*run the fix"):
        logits()
    assert q4k.drop_damaged(tmp_path, cache.sha256) == [cache.folder] and not cache.folder.exists()
    assert torch.equal(logits()[1], first)  # packed again from the GGUF


# ---- Q6_K ------------------------------------------------------------------------------------------

def test_packed_tiles_give_back_the_values_and_the_rows():
    w = random_q6k(64, 512, seed=6)
    packed = q6k.pack_tiles(w)
    back = q6k.unpack_tiles(packed)
    assert all(torch.equal(back[name], w[name]) for name in w)
    ids = torch.tensor([63, 0, 17, 17, 40])
    assert torch.equal(q6k.Q6KLinear(packed).rows(ids), q6k.dequantize(w)[ids])
    assert packed["w4"].numel() + packed["w2"].numel() == 64 * 512 * 6 // 8  # six bits a weight


def test_q6k_tiles_need_sixteen_outputs_and_256_inputs():
    with pytest.raises(ValueError, match="multiple of 16"):
        q6k.pack_tiles(random_q6k(8, 256))
    with pytest.raises(ValueError, match="Q6_K rows"):
        q6k.unpack_q6k(np.zeros((4, 100), np.uint8))


def test_a_draft_head_shares_a_q6k_or_q5_0_output_head_as_its_dequantised_rows():
    from adaspec.models.features import output_rows

    ids = torch.tensor([3, 31, 16])
    model = torch.nn.Module()
    for fmt, k in (("q6k", 256), ("q5_0", 64)):
        model.head, weights = random_layer(fmt, 32, k, seed=7)
        assert torch.equal(output_rows(model, ids), weights[ids])
    model.head, _ = random_layer("q4k", 32, 256, seed=7)  # Q4_K tiles give no single rows back
    with pytest.raises(AdaspecError, match="no output head a draft head can share"):
        output_rows(model, ids)


def test_rows_are_read_in_slices_that_give_any_number_of_ids_in_their_order():
    """A 32k-row drafting vocabulary is read 256 ids at a time (no float copy of a whole head)."""
    layer, weights = random_layer("q5_0", 64, 64, seed=8)
    ids = torch.randint(0, 64, (2500,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.rows(ids), weights[ids])


def test_gguf_tensor_names_map_onto_their_modules():
    assert q4k.module_for("output.weight") == "lm_head"
    assert q4k.module_for("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj"
    assert q4k.module_for("blk.3.attn_v.bias") is None and q4k.module_for("token_embd.weight") is None


@needs_qwen
def test_q6k_unpacking_reproduces_ggml_dequantisation_exactly():
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path(QWEN)))
    t = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q6_K)
    raw = np.asarray(t.data)
    w = q6k.unpack_q6k(raw)
    assert torch.equal(q6k.dequantize(w), torch.from_numpy(dequantize(raw, t.tensor_type).astype(np.float32)))
    assert int(w["q"].max()) == 63 and int(w["q"].min()) == 0  # six bits used whole


@needs_qwen
def test_the_q4k_model_computes_its_q6k_layers_with_the_files_values():
    from adaspec.api import load_model

    target, _ = load_model(QWEN, quant="q4k")
    layers = {n: m for n, m in target.model.named_modules() if isinstance(m, q6k.Q6KLinear)}
    assert len(layers) == 12 and all(n.endswith("mlp.down_proj") for n in layers)
    x = torch.randn(5, 4864, generator=torch.Generator().manual_seed(8))
    layer = next(iter(layers.values()))
    assert torch.equal(layer(x), torch.cat([layer(x[i:i + 1]) for i in range(5)]))


def test_q5_0_tiles_give_back_the_values_and_refuse_bad_shapes():
    w = random_q5_0(48, 96, seed=9)
    back = q5_0.unpack_tiles(q5_0.pack_tiles(w))
    assert torch.equal(back["q"], w["q"]) and torch.equal(back["d"], w["d"])
    with pytest.raises(ValueError, match="multiple of 16"):
        q5_0.pack_tiles(random_q5_0(8, 64))
    with pytest.raises(ValueError, match="Q5_0 rows"):
        q5_0.unpack_q5_0(np.zeros((4, 100), np.uint8))


@needs_qwen
def test_q5_0_unpacking_reproduces_ggml_dequantisation_exactly():
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path(QWEN)))
    t = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q5_0 and t.name.startswith("blk."))
    raw = np.asarray(t.data)
    w = q5_0.unpack_q5_0(raw)
    assert torch.equal(q5_0.dequantize(w), torch.from_numpy(dequantize(raw, t.tensor_type).astype(np.float32)))
    assert int(w["q"].max()) == 31 and int(w["q"].min()) == 0  # five bits used whole


@needs_qwen
def test_the_q4k_model_computes_its_q5_0_layers_with_the_files_values():
    from gguf import GGMLQuantizationType, GGUFReader

    from adaspec.api import load_model

    reader = GGUFReader(str(path(QWEN)))
    in_file = {q4k.module_for(t.name) for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q5_0}
    in_file.discard(None)  # the token embedding: kept as the file's rows, no linear layer
    drafter, _ = load_model(QWEN, quant="q4k")
    layers = {n: m for n, m in drafter.model.named_modules() if isinstance(m, q5_0.Q50Linear)}
    assert set(layers) == in_file and len(layers) == 24 * 5 + 12  # q, k, o, gate, up; half the v
    name = "model.layers.0.mlp.up_proj"
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    weight = q5_0.dequantize(q5_0.unpack_q5_0(np.asarray(t.data)))
    x = torch.randn(5, 896, generator=torch.Generator().manual_seed(8))
    y = layers[name](x)
    assert torch.equal(y, torch.cat([layers[name](x[i:i + 1]) for i in range(5)]))
    ref = x @ weight.T
    assert float((y - ref).norm() / ref.norm()) < 0.02


@needs_qwen
def test_a_q4k_a16_target_is_batch_invariant_lossless_and_closer_to_the_files_weights():
    from gguf import GGUFReader

    from adaspec.api import Engine, load, load_model
    from adaspec.calibration.identity import weights_fingerprint
    from adaspec.models.extension import BlockLinear, set_activations

    torch.set_num_threads(2)
    engine = load(QWEN, QWEN, quant="q4k-a16", head=False)
    target = engine.target

    def acts(model):
        return {m.acts for m in model.modules() if isinstance(m, BlockLinear)}

    assert acts(target.model) == {"a16"} and acts(engine.drafter.model) == {"a8"}  # the drafter runs q4k
    assert all(m.fused[1].acts == "a16" for m in target.model.modules() if getattr(m, "fused", None))  # what runs
    drafter = engine.drafter.model  # the same weights: only the activation form tells the fingerprints apart
    assert weights_fingerprint(target) != weights_fingerprint(engine.drafter)
    set_activations(drafter, "a16")
    assert weights_fingerprint(target) == weights_fingerprint(engine.drafter)
    set_activations(drafter, "a8")
    ids = torch.randint(0, target.vocab_size, (60,), generator=torch.Generator().manual_seed(0))
    target.extend(ids[:50])
    many = target.extend(ids[50:55])
    target.rollback(50)
    assert torch.equal(many, torch.cat([target.extend(ids[50 + i:51 + i]) for i in range(5)]))
    t = next(t for t in GGUFReader(str(path(QWEN))).tensors if t.name == "blk.0.ffn_up.weight")
    weight = q5_0.dequantize(q5_0.unpack_q5_0(np.asarray(t.data)))
    layer = target.model.get_submodule("model.layers.0.mlp.up_proj")
    x = torch.randn(5, 896, generator=torch.Generator().manual_seed(8))
    ref = x.double() @ weight.double().T
    assert float((layer(x).double() - ref).norm() / ref.norm()) < 1e-4
    # an int8 drafter disagrees more often than the same model in a8, so verification rejects too
    engine = Engine(target, load_model(QWEN, quant="int8", role="drafter")[0], engine.tokenizer)
    accepted = drafted = 0
    for prompt in ("Write a Python function that reverses a string.", "What is a hash map?"):
        ar = engine.generate(prompt, method="ar", max_new_tokens=32)
        sp = engine.generate(prompt, method="fixed", k=4, max_new_tokens=32)
        assert sp.token_ids == ar.token_ids, prompt
        accepted, drafted = accepted + sp.stats.accepted, drafted + sp.stats.drafted
    assert accepted < drafted
