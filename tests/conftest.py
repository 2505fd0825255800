"""Shared test set-up: offline mode and the reference fixtures."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

from tests.utils import Recorded, fixture_root


@pytest.fixture(scope="session")
def fixtures():
    return fixture_root()


@pytest.fixture(scope="session")
def recorded(fixtures):
    """`recorded("generation/default")` loads one recorded call."""
    return lambda name: Recorded(fixtures, name)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on 2 shared cores, training-like tests run several times faster."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fixture_pipe(fixtures):
    """HARTPipeline built from the fixture checkpoint in the official layout (do not modify it)."""
    from hart import HARTPipeline

    return HARTPipeline.from_official(fixtures / "ckpt", text_encoder=fixtures / "ckpt" / "text_encoder")


@pytest.fixture(scope="module")
def bundled():
    """The shipped shapes-world pipeline (hart/bundled/shapes-128), one per test module, progress bars off."""
    from hart import HARTPipeline
    from hart.bundled import BUNDLED_MODEL

    pipe = HARTPipeline.from_pretrained(BUNDLED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session", autouse=True)
def toy_decoder_refinement():
    """A fine-tune that refines its decoder (`hart.training.decoder_refine`) draws 4 + 4 latents and trains
    2 steps in tests, not 256 + 256 and 300: tests check what it does, not how well."""
    from hart.training import decoder_refine

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decoder_refine, "FINETUNE_USER_DRAWS", 4)
        mp.setattr(decoder_refine, "FINETUNE_WORLD_DRAWS", 4)
        mp.setattr(decoder_refine, "FINETUNE_STEPS", 2)
        yield
