"""New words get text tokens of their own when fine-tuning (`hart.training.new_words`), on the bundled model."""
import pytest
import torch

from hart.bundled import BUNDLED_MODEL
from hart.data.concepts import write_concept_dataset
from hart.pipelines import HARTPipeline
from hart.text import encode_prompts
from hart.training.checkpoint import CheckpointError
from hart.training.checks import SettingError
from hart.training.finetune import FinetuneConfig, finetune
from hart.training.new_words import add_words, pick_new_words

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = {"num_images": 8, "seed": 0, "world": "shapes"}


@pytest.fixture()
def bundled():
    return HARTPipeline.from_folder(BUNDLED_MODEL)


def test_new_words_are_the_spelled_words_the_world_never_uses(bundled):
    captions = ["a large pink ring in the top left", "two small pink rings", "a pink ring above a red circle"]
    # "large", "small", "two" and "above" are spelled out too, but the world's captions use them
    assert pick_new_words("auto", bundled.tokenizer, captions, WORLD) == ["pink", "ring", "rings"]
    prompts = {"num_images": 8, "seed": 0, "prompts": ["a large pink flower", "two rings above"], "guidance_scale": 4.5}
    assert pick_new_words("auto", bundled.tokenizer, captions, prompts) == ["ring", "small"]
    assert pick_new_words("auto", bundled.tokenizer, captions, None) == []  # no prior: nothing says what is known
    assert pick_new_words("none", bundled.tokenizer, captions, WORLD) == []
    assert pick_new_words(" Ring,pink ,", bundled.tokenizer, captions, WORLD) == ["pink", "ring"]


def test_added_words_are_whole_tokens_and_leave_other_prompts_alone(bundled):
    tok, te = bundled.tokenizer, bundled.text_encoder
    old = ["a red circle in the top left", "three large blue squares"]
    before = encode_prompts(old + ["a pink ring"], te, tok, 32)
    rows = te.get_input_embeddings().weight.shape[0]
    add_words(tok, te, ["pink", "ring"], seed=3)
    assert {"pink", "ring"} <= set(tok.tokenize("A Pink ring.")) and te.get_input_embeddings().weight.shape[0] == rows + 2
    after = encode_prompts(old + ["a pink ring"], te, tok, 32)
    assert torch.equal(after.features_BTC[:2], before.features_BTC[:2])
    assert not torch.allclose(after.features_BTC[2], before.features_BTC[2])
    new = te.get_input_embeddings().weight[rows:].detach()
    again = HARTPipeline.from_folder(BUNDLED_MODEL)
    add_words(again.tokenizer, again.text_encoder, ["pink", "ring"], seed=3)
    assert torch.equal(again.text_encoder.get_input_embeddings().weight[rows:], new)  # seeded: the export agrees
    assert not torch.equal(new[0], new[1])
    with pytest.raises(SettingError, match="already has a token for pink"):
        add_words(tok, te, ["pink"], seed=3)


def test_finetune_gives_new_words_tokens_and_exports_them(tmp_path):
    data = write_concept_dataset(tmp_path / "rings", "ring", "pink", n=4, seed=0)
    run = dict(pretrained=BUNDLED_MODEL, data_dir=str(data), output_dir=str(tmp_path / "run"), max_steps=2,
               batch_size=2, checkpoint_every=1, prior_images=4, validation_world_prompts=0, adapt_tokenizer="never",
               new_words="auto")
    result = finetune(FinetuneConfig(**run))
    pipe = HARTPipeline.from_folder(result.export_dir)
    assert pipe.tokenizer.tokenize("a pink ring") == ["▁a", "▁", "pink", "▁", "ring"]
    fresh = HARTPipeline.from_folder(BUNDLED_MODEL)
    add_words(fresh.tokenizer, fresh.text_encoder, ["pink", "ring"], seed=0)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, fresh.text_encoder.get_input_embeddings().weight)
    with pytest.raises(CheckpointError, match="new_words: checkpoint 'auto', now 'none'"):
        finetune(FinetuneConfig(**{**run, "new_words": "none", "max_steps": 3}, resume="latest"))


def test_a_cache_keeps_the_captions_so_a_run_on_the_cache_alone_finds_the_same_words(tmp_path):
    data = write_concept_dataset(tmp_path / "rings", "ring", "pink", n=4, seed=0)
    run = dict(pretrained=BUNDLED_MODEL, cache_dir=str(tmp_path / "cache"), max_steps=1, batch_size=2,
               prior_images=4, validation_world_prompts=0, adapt_tokenizer="never", new_words="pink,ring")
    finetune(FinetuneConfig(**run, data_dir=str(data), output_dir=str(tmp_path / "a")))
    again = finetune(FinetuneConfig(**run, output_dir=str(tmp_path / "b")))  # the cache's spec check passes
    assert HARTPipeline.from_folder(again.export_dir).tokenizer.tokenize("a pink ring")[-1] == "ring"
