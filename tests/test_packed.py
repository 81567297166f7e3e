"""The q4k model kept as it runs (models/packed.py): the GGUF's own embedding rows de-quantise to
the float rows exactly, a model read back from its folder computes the very logits of the model it
was built from, the folder holds packed weights (not float32) and a damaged folder is refused with
the command that fixes it, then removed by that command."""

import os
import shutil

import numpy as np
import pytest
import torch

from adaspec.config import AdaspecError
from adaspec.models import packed
from adaspec.models.registry import PRESETS, is_pulled, path

QWEN = "qwen2.5-coder-0.5b"
needs_qwen = pytest.mark.skipif(not is_pulled(QWEN), reason=f"{QWEN} is not pulled: run `adaspec models pull {QWEN}`")


def logits_of(model) -> tuple[torch.Tensor, torch.Tensor]:
    """A 40-token prefill and a 4-token step on adaspec's runtime (exact rows)."""
    from adaspec.models.fast import FastDecoder

    adapter = FastDecoder(model, "t", exact_rows=True)
    ids = torch.randint(0, adapter.vocab_size, (44,), generator=torch.Generator().manual_seed(0))
    return adapter.extend(ids[:40]), adapter.extend(ids[40:])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The 0.5B built from its GGUF, its logits, and the folder it was saved to."""
    torch.set_num_threads(2)
    from adaspec.models.registry import load_pretrained

    adapter, tokenizer = packed.build(lambda: load_pretrained(QWEN, convert_cache=False), path(QWEN))
    folder = tmp_path_factory.mktemp("packed") / "run-q4k"
    folder.mkdir()
    packed.save(adapter.model, tokenizer, folder)
    return logits_of(adapter.model), folder


def test_tensors_are_read_one_by_one_as_safetensors_reads_them(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 2, generator=g).bfloat16(), "u8": torch.randint(0, 256, (9,), dtype=torch.uint8),
               "i8": torch.randint(-128, 128, (4, 4), dtype=torch.int8), "i64": torch.arange(5),
               "b": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"what": "a test"})
    got, want = packed.read_tensors(tmp_path / "t.safetensors"), load_file(str(tmp_path / "t.safetensors"))
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


@needs_qwen
def test_gguf_embedding_rows_are_the_files_dequantised_rows():
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(str(path(QWEN))).tensors if t.name == "token_embd.weight")
    embed = packed.GGUFEmbedding.from_gguf(tensor)
    ids = torch.tensor([[0, 151935, 7], [7, 42, 0]])  # repeated ids, both ends of the table
    want = dequantize(np.asarray(tensor.data)[ids.reshape(-1).numpy()], tensor.tensor_type)
    got = embed(ids)
    assert got.shape == (2, 3, 896) and got.dtype == torch.float32
    assert torch.equal(got.reshape(6, 896), torch.from_numpy(want.astype(np.float32)))
    assert embed.raw.numel() < 151936 * 896  # under a byte a weight (Q5_0: 5.5 bits), not 4 bytes
    with pytest.raises(IndexError, match=r"token ids must be in \[0, 151936\)"):
        embed(torch.tensor([151936]))


@needs_qwen
def test_a_model_read_back_computes_the_built_models_logits_bit_for_bit(built):
    want, folder = built
    adapter, tokenizer = packed.load(folder, QWEN, fix="rebuild it")
    assert isinstance(adapter.model.get_input_embeddings(), packed.GGUFEmbedding)
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in adapter.model.modules())
    got = logits_of(adapter.model)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 1.3 * path(QWEN).stat().st_size  # packed weights: the float32 copy is 2.4 GB


@needs_qwen
def test_load_model_reads_the_packed_copy_after_the_first_load(monkeypatch):
    from adaspec.api import load_model
    from adaspec.models.fast import FastDecoder

    load_model(QWEN, quant="q4k")  # builds the copy if this machine has none yet
    monkeypatch.setattr(packed, "build", lambda *a: pytest.fail("the packed copy was not used"))
    target, _ = load_model(QWEN, quant="q4k")
    assert isinstance(target, FastDecoder) and target.exact_rows
    assert isinstance(target.model.get_input_embeddings(), packed.GGUFEmbedding)


@needs_qwen
def test_a_damaged_copy_is_refused_then_removed_by_the_pull_it_names(built, tmp_path, monkeypatch):
    from adaspec.api import load_model
    from adaspec.models import registry

    _, folder = built
    gguf = path(QWEN)
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    home = tmp_path / QWEN
    home.mkdir()
    os.symlink(gguf, home / gguf.name)  # the verified GGUF, without copying it
    shutil.copy(gguf.with_name(gguf.name + ".verified"), home / (gguf.name + ".verified"))
    copy = packed.folder_for(home, PRESETS[QWEN].sha256)
    shutil.copytree(folder, copy)
    data = bytearray((copy / packed.WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / packed.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(AdaspecError, match=rf"packed q4k copy .* is damaged \(model.safetensors was changed.*"
                                           rf"adaspec models pull {QWEN}"):
        load_model(QWEN, quant="q4k")
    monkeypatch.setattr(registry, "_assemble", lambda *a: pytest.fail("the verified GGUF was fetched again"))
    registry.pull(QWEN, progress=False)
    assert not copy.exists()


@needs_qwen
def test_the_chat_templates_opening_is_found_and_starts_every_chat_prompt(built):
    from transformers import AutoTokenizer

    from adaspec.api import Engine, load_model
    from adaspec.models.hf import HFTokenizer

    engine = Engine(load_model("tiny")[0], None, HFTokenizer(AutoTokenizer.from_pretrained(built[1])))
    head = engine.template_head()
    text = engine.tokenizer.decode(head)
    # the system message and the user turn's header, up to the newline, which merges with some texts' first characters
    assert text.startswith("system\nYou are Qwen") and text.endswith("\nuser") and len(head) >= 20, (text, head)
    for prompt in ("Write a quicksort.", "  indented", "\n\nblank lines first", "1 + 1?"):
        assert engine.encode(prompt)[: len(head)] == head
    assert Engine(engine.target, None, engine.tokenizer, chat=False).template_head() == []
