"""HARTPipeline behaves like a diffusers pipeline (fixture checkpoint, CPU, offline)."""
import copy

import numpy as np
import PIL.Image
import pytest
import torch

from hart import HARTPipeline, HARTTransformer
from hart.loading import CheckpointError


@pytest.fixture(scope="module")
def pipe(fixture_pipe):
    fixture_pipe.set_progress_bar_config(disable=True)
    return fixture_pipe


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run(pipe, prompt="a red circle", seed=0, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return pipe(prompt, generator=kwargs.pop("generator", gen(seed)), **kwargs).images


def test_save_load_round_trip_is_exact(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = HARTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(run(pipe), run(loaded))


def test_a_model_folder_carries_its_own_guidance(pipe, tmp_path):
    assert pipe.config.guidance_scale == 4.5  # the official layout: the release's guidance
    HARTPipeline(**pipe.components, guidance_scale=2.0).save_pretrained(tmp_path / "own")
    own = HARTPipeline.from_folder(tmp_path / "own")
    own.set_progress_bar_config(disable=True)
    assert own.config.guidance_scale == 2.0
    assert torch.equal(run(own), run(own, guidance_scale=2.0))
    assert torch.equal(run(own, guidance_scale=4.5), run(pipe)) and not torch.equal(run(own), run(pipe))
    with pytest.raises(ValueError, match="the model's `guidance_scale` must be a finite number >= 0"):
        HARTPipeline(**pipe.components, guidance_scale=-1.0)
    index = tmp_path / "own" / "model_index.json"
    index.write_text(index.read_text().replace('"guidance_scale": 2.0', '"guidance_scale": "high"'))
    with pytest.raises(CheckpointError, match="guidance_scale"):
        HARTPipeline.from_folder(tmp_path / "own")


def test_same_generator_same_image_and_seeds_differ(pipe):
    assert torch.equal(run(pipe, seed=3), run(pipe, seed=3))
    assert not torch.equal(run(pipe, seed=3), run(pipe, seed=4))


def test_per_image_generators_make_batches_match_single_calls(pipe):
    prompts = ["a red circle", "a blue square"]
    batch = run(pipe, prompts, generator=[gen(1), gen(2)])
    for i, seed in enumerate((1, 2)):
        alone = run(pipe, prompts[i], seed=seed)
        assert (batch[i] - alone[0]).abs().max() <= 1e-3


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(pipe, output_type):
    images = run(pipe, ["a", "b"], output_type=output_type, num_images_per_prompt=2)
    side = pipe.vae.downsample_factor * pipe.transformer.patch_nums[-1]
    if output_type == "pil":
        assert len(images) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (side, side) for im in images)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (4, side, side, 3)
        assert images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert images.shape == (4, 3, side, side) and images.min() >= 0 and images.max() <= 1
    else:
        P = pipe.transformer.patch_nums[-1]
        assert images.shape == (4, pipe.vae.config.latent_channels, P, P)


def test_return_dict_false_gives_a_tuple(pipe):
    out = pipe("a", generator=gen(0), output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and out[0].shape[0] == 1


def test_negative_prompt_and_guidance_change_the_result(pipe):
    base = run(pipe, seed=5)
    assert not torch.equal(base, run(pipe, seed=5, negative_prompt="a blue square"))
    assert not torch.equal(base, run(pipe, seed=5, guidance_scale=1.0))


def test_top_k_and_top_p_are_honoured(pipe):
    seen = {}

    def grab(p, si, side, tensors):
        seen.setdefault(si, []).append((tensors["idx"], tensors["logits"]))
        return {}

    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        seen.clear()
        run(pipe, seed=1, more_smooth=False, callback_on_step_end=grab,
            callback_on_step_end_tensor_inputs=["idx", "logits"], **kwargs)
        for si, [(idx, logits)] in seen.items():
            assert torch.equal(idx, logits.argmax(-1)), (kwargs, si)


def test_callback_fires_once_per_scale_with_tensors_and_can_interrupt(pipe):
    calls = []

    def record(p, si, side, tensors):
        calls.append((si, side, {k: v.shape for k, v in tensors.items()}, tensors["preview"].clone()))
        return {}

    run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["f_hat", "idx", "preview"])
    pn = pipe.transformer.patch_nums
    assert [c[0] for c in calls] == list(range(len(pn))) and [c[1] for c in calls] == list(pn)
    P, Cv = pn[-1], pipe.vae.config.latent_channels
    for si, side, shapes, preview in calls:
        assert shapes["f_hat"] == (1, Cv, P, P) and shapes["idx"] == (1, side * side)
        assert preview.min() >= 0 and preview.max() <= 1
    assert calls[0][3].shape[-1] < calls[-1][3].shape[-1]  # previews grow coarse to fine

    def stop(p, si, side, tensors):
        calls.append(si)
        p._interrupt = si >= 1
        return {}

    calls.clear()
    out = run(pipe, callback_on_step_end=stop, output_type="latent")
    assert calls == [0, 1] and out.shape[-1] == P


def test_bf16_on_cpu_generates(pipe):
    bf16 = copy.deepcopy(pipe).to(torch.bfloat16)
    images = run(bf16, ["a", "b"])
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"prompt": None}, TypeError, "prompt"),
        ({"prompt": 3}, TypeError, "prompt"),
        ({"prompt": ["a", 1]}, TypeError, "prompt"),
        ({"prompt": ""}, ValueError, "empty"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, ValueError, "negative_prompt"),
        ({"generator": [torch.Generator()] * 3}, ValueError, "generator"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 10**6}, ValueError, "top_k"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"output_type": "jpeg"}, ValueError, "output_type"),
        ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt"),
        ({"max_sequence_length": 77}, ValueError, "max_sequence_length"),
        ({"callback_on_step_end_tensor_inputs": ["latents"]}, ValueError, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(pipe, monkeypatch, kwargs, error, words):
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded before checking"))
    kwargs = {"prompt": "a", **kwargs}
    with pytest.raises(error, match=words):
        pipe(**kwargs)


def test_text_encoder_of_the_wrong_width_is_refused(pipe):
    cfg = dict(pipe.transformer.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["context_dim"] = cfg["context_dim"] * 2
    wrong = HARTPipeline(pipe.tokenizer, pipe.text_encoder, HARTTransformer(**cfg), pipe.vae)
    with pytest.raises(ValueError, match="hidden size"):
        wrong("a", generator=gen(0))


def test_missing_or_unknown_model_folders_are_refused(tmp_path, fixtures):
    with pytest.raises(CheckpointError, match="not found"):
        HARTPipeline.from_official(tmp_path / "nope", text_encoder=fixtures / "ckpt" / "text_encoder")
    with pytest.raises(CheckpointError, match="llm/config.json"):
        HARTPipeline.from_official(tmp_path, text_encoder=fixtures / "ckpt" / "text_encoder")


def test_model_cpu_offload_hooks_fire_for_hart_calls(pipe):
    offloaded = copy.deepcopy(pipe)
    offloaded.enable_model_cpu_offload(device="cpu")  # the same hooks a GPU run installs
    assert hasattr(offloaded.transformer, "_hf_hook")
    assert torch.equal(run(offloaded), run(pipe))


def test_head_and_decoder_in_bf16_inside_an_fp32_pipeline(fixture_pipe):
    """`set_head_and_decoder_dtype`: the diffusion head and the decoder in bf16, the rest fp32; the image
    moves by bf16 rounding only."""
    pipe = copy.deepcopy(fixture_pipe)
    call = dict(prompt="a red square", generator=torch.Generator().manual_seed(0), output_type="pt")
    reference = pipe(**call).images
    pipe.set_head_and_decoder_dtype(torch.bfloat16)
    assert pipe.transformer.diffusion_head.net.input_proj.weight.dtype == torch.bfloat16
    assert pipe.vae.decoder.conv_in.weight.dtype == pipe.vae.post_quant_conv.weight.dtype == torch.bfloat16
    assert pipe.transformer.head.weight.dtype == pipe.vae.quantize.embedding.weight.dtype == torch.float32
    assert pipe.vae.encoder.conv_in.weight.dtype == torch.float32
    call["generator"] = torch.Generator().manual_seed(0)
    images = pipe(**call).images
    assert images.dtype == torch.float32
    assert 0 < (images - reference).abs().max() < 0.1
