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
    assert_close(cond.features_BTC, rec[key], 1e-4, key)


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
