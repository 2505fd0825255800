"""Property tests of the pipeline's argument checking (hypothesis; needs the `test` extra).

Any combination of arguments either runs and returns valid images, or raises exactly the documented
error type (TypeError for a wrong type of prompt or generator, ValueError otherwise) before any heavy
work (the text encoder is never reached); never another exception.
"""
import math
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hart.limits import MAX_GUIDANCE_SCALE
from hart.pipelines.pipeline_hart import OUTPUT_TYPES, HARTPipeline
from tests.utils import fixture_sizes

_SIZES = fixture_sizes()  # the fixture checkpoint's: the strategies below are built at import
VOCAB = _SIZES.vocab_size
SIDE, LATENT_SIDE, LATENT_CHANNELS = _SIZES.image_size, _SIZES.patch_nums[-1], _SIZES.latent_channels
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(fixture_pipe):
    fixture_pipe.set_progress_bar_config(disable=True)
    return fixture_pipe


def mostly(valid, invalid, odds: int = 6):
    """`valid` five times in six, else `invalid`: most examples then get past every check but one."""
    return st.sampled_from([True] * (odds - 1) + [False]).flatmap(lambda ok: valid if ok else invalid)


words = st.text(st.characters(codec="utf-8", categories=("L", "N", "Zs", "P")), min_size=1, max_size=12)
good_prompt = words.filter(lambda s: s.strip())
prompts = mostly(
    st.one_of(good_prompt, st.lists(good_prompt, min_size=1, max_size=2)),
    st.one_of(
        st.sampled_from(["", "   ", [], ["ok", ""]]),  # right type, bad value
        st.none(), st.integers(), st.floats(), st.lists(st.integers(), min_size=1, max_size=2),
        st.tuples(good_prompt, st.integers()), st.binary(max_size=4),  # wrong types
    ))
negative_prompts = mostly(st.one_of(st.none(), good_prompt, st.lists(good_prompt, min_size=1, max_size=1)),
                          st.one_of(st.lists(good_prompt, min_size=0, max_size=3), st.integers(), st.just([None])))
numbers = mostly(st.one_of(st.floats(0, 15), st.integers(0, 20), st.just(MAX_GUIDANCE_SCALE)),
                 st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-5, 0, exclude_max=True),
                           st.integers(-3, -1), st.booleans(), st.just("4.5"),
                           st.floats(MAX_GUIDANCE_SCALE, 1e300, exclude_min=True)))
top_ks = mostly(st.one_of(st.none(), st.integers(1, VOCAB), st.sampled_from([1, VOCAB])),
                st.one_of(st.integers(-2, 0), st.integers(VOCAB + 1, VOCAB + 3), st.floats(0, 10), st.booleans()))
top_ps = mostly(st.one_of(st.none(), st.floats(0, 1, exclude_min=True), st.just(1.0), st.just(1)),
                st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 0), st.integers(-1, 2),
                          st.booleans()))
output_types = mostly(st.sampled_from(OUTPUT_TYPES), st.sampled_from(["jpeg", "PIL", None, 3]))
images_per_prompt = mostly(st.integers(1, 2), st.one_of(st.integers(-1, 0), st.booleans(), st.just(1.0), st.just("2")))


@st.composite
def generators(draw):
    """A function of the batch size: None, one generator, a list (usually one per image) or junk."""
    kind = draw(st.sampled_from(["one", "list", "none", "list", "junk", "list-with-junk"]))
    if kind == "none":
        return lambda batch: None
    if kind == "one":
        seed = draw(st.integers(0, 2**32))
        return lambda batch: torch.Generator().manual_seed(seed)
    if kind == "junk":
        junk = draw(st.sampled_from([0, "seed", 1.5]))
        return lambda batch: junk
    off_by = draw(st.sampled_from([0, 0, 0, -1, 1, 3]))  # usually one per image, else refused
    junk_at = draw(st.integers(0, 3)) if kind == "list-with-junk" else None

    def make(batch):
        gens = [torch.Generator().manual_seed(i) for i in range(max(0, batch + off_by))]
        if junk_at is not None and gens:
            gens[junk_at % len(gens)] = 7
        return gens
    return make


def batch_size(prompt, n) -> int:
    """Images asked for, where the arguments make sense (else any number: the call is refused anyway)."""
    count = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, (list, tuple)) else 1
    return count * n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else count


def check_output(images, output_type: str, batch: int) -> None:
    if output_type == "pil":
        assert isinstance(images, list) and len(images) == batch
        assert all(isinstance(im, PIL.Image.Image) and im.size == (SIDE, SIDE) and im.mode == "RGB" for im in images)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (batch, SIDE, SIDE, 3)
        assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert isinstance(images, torch.Tensor) and images.shape == (batch, 3, SIDE, SIDE)
        assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    else:
        assert isinstance(images, torch.Tensor) and images.shape == (batch, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
        assert torch.isfinite(images).all()


def call_counting_encoder(pipe, **kwargs):
    """`pipe(**kwargs)` -> (result or exception, whether the text encoder was reached)."""
    original = HARTPipeline.encode_prompt
    with mock.patch.object(HARTPipeline, "encode_prompt", autospec=True, side_effect=original) as encode:
        try:
            return pipe(**kwargs), encode.called
        except Exception as e:  # judged by the caller
            return e, encode.called


@SETTINGS
@given(prompt=prompts, negative_prompt=negative_prompts, num_images_per_prompt=images_per_prompt,
       guidance_scale=numbers, top_k=top_ks, top_p=top_ps, output_type=output_types, generator=generators())
def test_any_arguments_run_or_raise_the_documented_error(pipe, prompt, negative_prompt, num_images_per_prompt,
                                                         guidance_scale, top_k, top_p, output_type, generator):
    out, reached_encoder = call_counting_encoder(
        pipe, prompt=prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
        guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, output_type=output_type,
        generator=generator(batch_size(prompt, num_images_per_prompt)))
    if isinstance(out, Exception):
        event(f"refused: {type(out).__name__} {str(out).split()[0]}")
        assert type(out) in (TypeError, ValueError), f"{type(out).__name__}: {out}"
        assert str(out).startswith("`"), f"the message does not name the argument: {out}"
        assert not reached_encoder, f"refused only after encoding the prompt: {out}"
        return
    event(f"ran: {output_type}")
    batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
    check_output(out.images, output_type, batch)


@SETTINGS
@given(prompt=st.one_of(good_prompt, st.lists(good_prompt, min_size=1, max_size=2)),
       n=st.integers(1, 2),
       guidance_scale=st.one_of(st.floats(0, 12), st.integers(0, 10), st.just(MAX_GUIDANCE_SCALE)),
       top_k=st.one_of(st.none(), st.integers(1, VOCAB)),
       top_p=st.one_of(st.none(), st.floats(0, 1, exclude_min=True)),
       output_type=st.sampled_from(OUTPUT_TYPES), per_image_generators=st.booleans(), with_negative=st.booleans())
def test_valid_arguments_always_give_valid_images(pipe, prompt, n, guidance_scale, top_k, top_p, output_type,
                                                  per_image_generators, with_negative):
    prompts = [prompt] if isinstance(prompt, str) else prompt
    batch = len(prompts) * n
    generator = [torch.Generator().manual_seed(i) for i in range(batch)] if per_image_generators \
        else torch.Generator().manual_seed(0)
    negative = ["blurry"] * len(prompts) if with_negative else None
    out = pipe(prompt, negative_prompt=negative, num_images_per_prompt=n, guidance_scale=guidance_scale, top_k=top_k,
               top_p=top_p, output_type=output_type, generator=generator)
    check_output(out.images, output_type, batch)
    assert math.isfinite(guidance_scale)
