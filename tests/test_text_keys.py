"""Only real text keys (hart.text_keys): duplicate padding positions merged, images unchanged."""
import math

import pytest
import torch
import torch.nn.functional as F

from hart import sampling
from hart.sampling import sample_scales
from hart.text import TextConditioning
from hart.text_keys import attention_bias, compact_text
from tests.utils import fixture_sizes

RIGHT_PADDED = fixture_sizes().padding_side == "right"  # compaction merges trailing padding only


def _toy_text(lengths, T=12, D=4, seed=0):
    """Right-padded rows as the text encoder gives them: pads share one feature and the last position."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), T, D, generator=g)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    for b, n in enumerate(lengths):
        feats[b, n:] = feats[b, n] if n < T else feats[b, -1]
    return TextConditioning(feats, mask, mask.long().cumsum(1) - 1)


def test_compaction_keeps_distinct_positions_and_one_weighted_representative():
    cond = _toy_text([3, 5, 6])
    uncond = TextConditioning.unconditional(3, 12, 4, "cpu")
    c, u, bias = compact_text(cond, uncond)
    assert c.features_BTC.shape == (3, 7, 4) and u.features_BTC.shape == (3, 7, 4)  # the longest prompt + 1
    # row 0: 3 real tokens, 3 fillers, then the representative of 9 pads
    assert bias[0].tolist() == [0, 0, 0, -math.inf, -math.inf, -math.inf, pytest.approx(math.log(9))]
    assert torch.equal(c.features_BTC[0, :3], cond.features_BTC[0, :3])
    assert torch.equal(c.features_BTC[0, -1], cond.features_BTC[0, -1])
    assert c.mask_BT[0].tolist() == [True] * 3 + [False] * 4
    assert c.position_ids_BT[:, -1].tolist() == cond.position_ids_BT[:, -1].tolist()
    assert bias[2].tolist() == [0] * 6 + [pytest.approx(math.log(6))]
    assert bias[3:].tolist() == [[-math.inf] * 6 + [pytest.approx(math.log(12))]] * 3  # unconditional rows
    assert u.mask_BT[:, -1].all() and not u.mask_BT[:, :-1].any()


def test_a_full_row_sets_the_common_length():
    c, _, bias = compact_text(_toy_text([2, 12]), TextConditioning.unconditional(2, 12, 4, "cpu"))
    assert c.features_BTC.shape[1] == 12 and bias[1].eq(0).all()  # the full row: 11 distinct + its last
    assert torch.equal(c.features_BTC[1], _toy_text([2, 12]).features_BTC[1])


def test_distinct_padding_features_are_not_merged():
    """An encoder that gives its pads different features leaves nothing to merge: still exact."""
    cond = _toy_text([3, 5])
    cond.features_BTC[:, 5:] += torch.arange(7.0).view(1, 7, 1)  # every pad different
    c, _, bias = compact_text(cond, TextConditioning.unconditional(2, 12, 4, "cpu"))
    assert c.features_BTC.shape[1] == 12 and torch.equal(c.features_BTC, cond.features_BTC)
    assert bias[:2].eq(0).all()


def test_pooling_is_unchanged():
    cond = _toy_text([3, 7])
    c, u, _ = compact_text(cond, TextConditioning.unconditional(2, 12, 4, "cpu"))
    torch.testing.assert_close(c.features_BTC.max(1).values, cond.features_BTC.max(1).values, rtol=0, atol=0)
    avg = lambda t: (t.features_BTC * t.mask_BT.unsqueeze(-1)).sum(1) / t.mask_BT.sum(1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(avg(c), avg(cond))


def test_biased_attention_over_merged_keys_equals_attention_over_duplicates():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    distinct = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    dup = torch.randn(1, 2, 1, 8, generator=g, dtype=torch.float64)
    image = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)
    full_k = torch.cat([distinct, dup.expand(-1, -1, 9, -1), image], 2)
    merged_k = torch.cat([distinct, dup, dup, image], 2)  # one filler, then the representative
    bias = attention_bias(torch.tensor([[0, 0, 0, -math.inf, math.log(9)]], dtype=torch.float64), 11, torch.float64)
    out_full = F.scaled_dot_product_attention(q, full_k, full_k * 2, scale=0.3)
    out_merged = F.scaled_dot_product_attention(q, merged_k, merged_k * 2, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out_merged, out_full)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="differ in shape"):
        compact_text(_toy_text([2]), TextConditioning.unconditional(1, 10, 4, "cpu"))
    with pytest.raises(ValueError, match="cannot hold"):
        attention_bias(torch.zeros(1, 5), 3, torch.float32)


# ---- on the fixture model: the compacted text gives the same latent as the full 300 positions ----

def _sample(pipe, cond, uncond, seed=0, **options):
    """(latent, per-scale token maps, per-scale guided logits) of one seeded sampling call."""
    g = [torch.Generator().manual_seed(seed + i) for i in range(cond.batch_size)]
    stages = []
    latent = sample_scales(pipe.transformer, pipe.vae.quantize, cond, uncond, guidance_scale=4.5, generator=g,
                           more_smooth=True, callback=stages.append, **options)
    return latent, [s.idx_Bl for s in stages], [s.logits_BlV for s in stages]


@pytest.mark.parametrize("negative", [False, True])
def test_compacted_text_gives_the_same_tokens_latent_and_image(fixture_pipe, negative):
    pipe = fixture_pipe
    cond = pipe.encode_prompt(["a red cube on a table", "two circles"])
    T, D = cond.features_BTC.shape[1:]
    uncond = pipe.encode_prompt(["blurry", "blurry"]) if negative else TextConditioning.unconditional(2, T, D, "cpu")
    compacted = compact_text(cond, uncond)[0].features_BTC.shape[1]
    if RIGHT_PADDED:  # the padding trails each prompt and merges into one key: a few positions are left
        assert compacted < T // 10
    else:  # left padding leads: nothing of the conditional rows merges (the result must still be exact)
        assert compacted == T
    full, full_idx, full_logits = _sample(pipe, cond, uncond, compact_text=False)
    compact, compact_idx, compact_logits = _sample(pipe, cond, uncond, compact_text=True)
    # The same up to float32 rounding (the softmax sums fewer, weighted terms): a few ulps in the logits
    # (|logits| ~ 30) at scale 0, growing through the scales and the gumbel softmax at tau 0.005.
    for si, (a, b) in enumerate(zip(compact_idx, full_idx)):
        assert torch.equal(a, b), f"scale {si}: different tokens"
    for a, b in zip(compact_logits, full_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(compact, full, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(pipe.decode_latent(compact), pipe.decode_latent(full), rtol=1e-3, atol=1e-3)


def test_cutting_the_padding_without_the_bias_changes_the_image(fixture_pipe, monkeypatch):
    """Why the bias: the released model attends to its padding, so plain trimming is not exact."""
    pipe = fixture_pipe
    cond = pipe.encode_prompt(["a red cube on a table", "two circles"])
    T, D = cond.features_BTC.shape[1:]
    uncond = TextConditioning.unconditional(2, T, D, "cpu")
    full = _sample(pipe, cond, uncond, compact_text=False)[0]
    n = int(cond.mask_BT.sum(1).max())

    def cut_without_bias(c, u):
        return TextConditioning(*(t[:, :n] for t in c)), TextConditioning(*(t[:, :n] for t in u)), torch.zeros(4, n)

    monkeypatch.setattr(sampling, "compact_text", cut_without_bias)
    assert (_sample(pipe, cond, uncond, compact_text=True)[0] - full).abs().max() > 0.1
