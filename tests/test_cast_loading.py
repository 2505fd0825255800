"""Weights cast while loading: every loader in a dtype gives what loading in fp32 and casting gives."""
import copy
import shutil

import pytest
import torch

from hart import HARTPipeline, HARTTransformer, HybridTokenizer
from hart.models.pretrained import CastWhileLoading
from hart.loading import CheckpointError, load_official_tokenizer, load_official_transformer, read_weights


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, dtype: torch.dtype) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert {p.dtype for p in a.parameters()} == {dtype}
    assert not any(p.is_meta for p in a.parameters())


@pytest.mark.parametrize("load", [load_official_transformer, load_official_tokenizer])
def test_official_loaders_cast_while_loading(fixtures, load):
    folder = fixtures / "ckpt" / ("llm" if load is load_official_transformer else "tokenizer")
    cast = load(folder, torch_dtype=torch.bfloat16)
    assert_same_state(cast, load(folder).to(torch.bfloat16), torch.bfloat16)
    assert {p.dtype for p in load(folder).parameters()} == {torch.float32}  # the default stays fp32
    assert not cast.training


def test_read_weights_casts_floating_tensors_only(fixtures, tmp_path):
    path = fixtures / "ckpt" / "llm" / "model.safetensors"
    full, cast = read_weights(path), read_weights(path, torch.bfloat16)
    for k, v in full.items():
        assert torch.equal(cast[k], v.to(torch.bfloat16) if v.is_floating_point() else v), k
    torch.save(full, tmp_path / "pytorch_model.bin")  # the pickle path casts too
    pickled = read_weights(tmp_path / "pytorch_model.bin", torch.bfloat16)
    assert all(torch.equal(pickled[k], cast[k]) for k in cast)


def test_mapped_pickle_pages_dropped_after_a_cast_still_read_right(tmp_path):
    """A storage shared by two tensors: its pages, dropped after the first cast, come back from the file."""
    big = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))  # 1 MiB: whole pages
    state = {"a": big, "b": big[3:5], "c": torch.arange(5)}
    for name, zipped in (("new.bin", True), ("legacy.bin", False)):
        torch.save(state, tmp_path / name, _use_new_zipfile_serialization=zipped)
        for dtype in (torch.bfloat16, torch.float16, None):
            loaded = read_weights(tmp_path / name, dtype)
            for k, v in state.items():
                expected = v.to(dtype) if dtype is not None and v.is_floating_point() else v
                assert loaded[k].dtype == expected.dtype and torch.equal(loaded[k], expected), (name, dtype, k)


@pytest.fixture(scope="module")
def saved_models(fixture_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    fixture_pipe.transformer.save_pretrained(root / "transformer")
    fixture_pipe.vae.save_pretrained(root / "vae")
    return root


@pytest.mark.parametrize("cls,name", [(HARTTransformer, "transformer"), (HybridTokenizer, "vae")])
def test_from_pretrained_casts_while_loading(fixture_pipe, saved_models, tmp_path, cls, name):
    model = getattr(fixture_pipe, name)
    cast = cls.from_pretrained(saved_models / name, torch_dtype=torch.bfloat16)
    assert_same_state(cast, cls.from_pretrained(saved_models / name).to(torch.bfloat16), torch.bfloat16)
    by_diffusers = super(CastWhileLoading, cls).from_pretrained(saved_models / name, torch_dtype=torch.bfloat16)
    assert_same_state(cast, by_diffusers, torch.bfloat16)
    assert cast.config == by_diffusers.config and not cast.training
    assert all(p.requires_grad for p in cast.parameters())  # as diffusers returns them: trainable
    # a bf16 state dict saved as such loads to the same weights; without a dtype in fp32, as diffusers does
    cls.from_pretrained(saved_models / name).to(torch.bfloat16).save_pretrained(tmp_path / name)
    assert_same_state(cls.from_pretrained(tmp_path / name, torch_dtype=torch.bfloat16), cast, torch.bfloat16)
    assert_same_state(cls.from_pretrained(tmp_path / name), super(CastWhileLoading, cls).from_pretrained(
        tmp_path / name), torch.float32)
    assert_same_state(cls.from_pretrained(saved_models / name, torch_dtype=torch.float32), model, torch.float32)


def test_from_pretrained_misfit_weights_name_the_file(fixture_pipe, saved_models, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(saved_models / "vae", folder)
    shutil.copy(saved_models / "transformer" / "diffusion_pytorch_model.safetensors", folder)
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors does not fit HybridTokenizer"):
        HybridTokenizer.from_pretrained(folder, torch_dtype=torch.bfloat16)


def test_pipeline_from_folder_in_bf16(fixture_pipe, tmp_path):
    fixture_pipe.save_pretrained(tmp_path)
    pipe = HARTPipeline.from_folder(tmp_path, torch_dtype=torch.bfloat16)
    assert_same_state(pipe.transformer, copy.deepcopy(fixture_pipe.transformer).to(torch.bfloat16), torch.bfloat16)
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
