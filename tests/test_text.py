"""Text encoding matches the reference's `encode_prompts` on the fixture text model."""
import pytest
import torch
from transformers import AutoModel, PreTrainedTokenizerFast

from hart.text import SYSTEM_PROMPT, check_prompts, encode_prompts
from tests.utils import assert_close


@pytest.fixture(scope="module")
def text_model(fixtures):
    folder = fixtures / "ckpt" / "text_encoder"
    return AutoModel.from_pretrained(folder).eval(), PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("system_prompt,key", [(SYSTEM_PROMPT, "context_tensor"), (None, "context_tensor_no_system_prompt")])
def test_encode_prompts_matches_reference(recorded, text_model, system_prompt, key):
    rec = recorded("text_encoder/encode_prompts")
    model, tokenizer = text_model
    max_length = rec["context_tokens"].shape[1]
    cond = encode_prompts(rec.meta["prompts"], model, tokenizer, max_length=max_length, system_prompt=system_prompt)
    assert torch.equal(cond.mask_BT, rec["context_mask"])
    assert torch.equal(cond.position_ids_BT, rec["context_position_ids"])
    real_BT = cond.mask_BT
    assert_close(cond.features_BTC[real_BT], rec[key][real_BT], 1e-4, f"{key} at real tokens")
    # A padding token's feature is defined when its attention row in the text model sees an unmasked
    # token: the system prompt, or a real token before it (causal attention), i.e. position id >= 0.
    # Left padding without the system prompt leaves the leading pads nothing to attend to, and what
    # an attention kernel returns for such a row is its own choice (eager and SDPA differ by units),
    # so those positions are left out. The others are compared: the transformer reads padding
    # features too (test_transformer::test_padding_features_reach_the_output_as_released).
    defined_BT = cond.position_ids_BT >= 0 if system_prompt is None else torch.ones_like(real_BT)
    assert_close(cond.features_BTC[defined_BT], rec[key][defined_BT], 1e-4, f"{key} at defined positions")


def test_tokenizer_pads_on_the_recorded_side(recorded, text_model, fixture_pipe):
    """The padding side comes from the checkpoint's `tokenizer_config.json`, in every loader."""
    rec = recorded("text_encoder/encode_prompts")
    for tokenizer in (text_model[1], fixture_pipe.tokenizer):
        assert tokenizer.padding_side == rec.meta["padding_side"]
        ids = tokenizer(rec.meta["prompts"], padding="max_length", max_length=rec["context_tokens"].shape[1],
                        truncation=True, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, rec["context_tokens"])


def test_system_prompt_tokens_match_reference(recorded, text_model):
    rec = recorded("text_encoder/encode_prompts")
    _, tokenizer = text_model
    ids = tokenizer(SYSTEM_PROMPT, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, rec["system_prompt_tokens"])


def test_long_prompt_is_truncated_with_warning(text_model, caplog):
    model, tokenizer = text_model
    cond = encode_prompts(["cat " * 50], model, tokenizer, max_length=16, system_prompt=None)
    assert cond.features_BTC.shape[1] == 16 and bool(cond.mask_BT.all())
    assert "truncated" in caplog.text


@pytest.mark.parametrize("bad,error", [(None, TypeError), ([], ValueError), ([""], ValueError), (["a", 3], TypeError)])
def test_bad_prompts_are_refused(bad, error):
    with pytest.raises(error, match="prompt"):
        check_prompts(bad)


def test_split_words_names_the_words_a_tokenizer_spells_out():
    from transformers import PreTrainedTokenizerFast

    from hart.bundled import BUNDLED_MODEL
    from hart.text import split_words

    tokenizer = PreTrainedTokenizerFast.from_pretrained(f"{BUNDLED_MODEL}/tokenizer")
    captions = ["A green star in the top left.", "a red circle", "a pink ring"]
    assert split_words(tokenizer, captions) == ["pink", "ring", "star"]  # known whole: green, top, left, circle...
