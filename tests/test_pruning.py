"""Cached token pruning (hart.pruning) on toy tensors."""
import pytest
import torch
import torch.nn.functional as F

from hart.pruning import (
    DEFAULT_KEEP, gather_tokens, num_kept, pivotal_indices, pruned_scales, restore_tokens, upsample_tokens,
)

SCALES_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def test_the_kept_fraction_doubles_at_each_smaller_scale_while_under_one():
    assert pruned_scales(SCALES_1024, DEFAULT_KEEP) == {12: 0.5, 13: 0.25}  # sides 48 and 64, as FastVAR's HART
    assert pruned_scales(SCALES_1024, 0.1) == pytest.approx({10: 0.8, 11: 0.4, 12: 0.2, 13: 0.1})
    assert pruned_scales(SCALES_1024, 0.5) == {13: 0.5}
    assert pruned_scales((1, 2, 3, 4, 6, 8, 11, 16), 0.25) == {6: 0.5, 7: 0.25}  # the bundled model: 11 and 16
    assert pruned_scales((1, 2, 3, 4), 0.01) == {2: 0.02, 3: 0.01}  # scale 1 has nothing before it to restore from
    assert pruned_scales(SCALES_1024, 1.0) == {}  # keeping everything is no pruning


def test_num_kept_rounds_and_stays_in_range():
    assert num_kept(64, 0.25) == 1024
    assert num_kept(48, 0.5) == 1152
    assert num_kept(2, 0.01) == 1
    assert num_kept(5, 1.0) == 25


def _smooth_prev_and_input(B=2, C=3, q=4, p=8, bumps=(5, 17, 40, 63)):
    g = torch.Generator().manual_seed(0)
    prev_BCqq = torch.randn(B, C, q, q, generator=g)
    input_BCpp = F.interpolate(prev_BCqq, size=(p, p), mode="area")
    flat = input_BCpp.flatten(2)
    for rank, i in enumerate(bumps):  # new detail at known tokens, strongest first
        flat[:, :, i] += 10.0 - rank
    return prev_BCqq, flat.view(B, C, p, p)


def test_pivotal_tokens_are_where_the_scale_adds_detail():
    prev_BCqq, input_BCpp = _smooth_prev_and_input()
    idx_Bk = pivotal_indices(input_BCpp, prev_BCqq, keep=4 / 64)
    assert idx_Bk.tolist() == [[5, 17, 40, 63]] * 2
    idx_Bk = pivotal_indices(input_BCpp, prev_BCqq, keep=2 / 64)  # the two largest changes, in row order
    assert idx_Bk.tolist() == [[5, 17]] * 2


def test_pivotal_indices_are_ascending_unique_and_sized():
    g = torch.Generator().manual_seed(1)
    idx_Bk = pivotal_indices(torch.randn(3, 4, 12, 12, generator=g), torch.randn(3, 4, 9, 9, generator=g), keep=0.3)
    assert idx_Bk.shape == (3, num_kept(12, 0.3))
    assert (idx_Bk.diff(dim=1) > 0).all() and idx_Bk.min() >= 0 and idx_Bk.max() < 144


def test_restore_writes_forwarded_tokens_over_the_upsampled_cache():
    g = torch.Generator().manual_seed(2)
    cached_BqC, idx_Bk = torch.randn(2, 9, 5, generator=g), torch.tensor([[0, 7, 20], [3, 4, 35]])
    forwarded_BkC = torch.randn(2, 3, 5, generator=g)
    out_BlC = restore_tokens(forwarded_BkC, idx_Bk, cached_BqC, side=6)
    up_BlC = upsample_tokens(cached_BqC, 6)
    assert out_BlC.shape == (2, 36, 5)
    assert torch.equal(gather_tokens(out_BlC, idx_Bk), forwarded_BkC)
    kept = torch.zeros(2, 36, dtype=torch.bool).scatter(1, idx_Bk, True)
    assert torch.equal(out_BlC[~kept], up_BlC[~kept])


def test_pruned_tokenwise_branch_is_exact_where_nothing_new_was_added():
    """A token-wise affine branch commutes with area upsampling, so restoring the previous scale's
    outputs is exact wherever the input is the previous input upsampled: the premise of the method."""
    prev_BCqq, input_BCpp = _smooth_prev_and_input()
    branch = torch.nn.Linear(3, 6).double()
    to_tokens = lambda x_BCpp: x_BCpp.flatten(2).transpose(1, 2).double()  # noqa: E731
    with torch.no_grad():
        full_BlC = branch(to_tokens(input_BCpp))
        idx_Bk = pivotal_indices(input_BCpp, prev_BCqq, keep=4 / 64)
        pruned_BlC = restore_tokens(branch(gather_tokens(to_tokens(input_BCpp), idx_Bk)), idx_Bk,
                                    branch(to_tokens(prev_BCqq)), side=8)
    torch.testing.assert_close(pruned_BlC, full_BlC)
    # with fewer tokens kept, a bumped token is restored from the cache and the result differs there
    with torch.no_grad():
        idx_Bk = pivotal_indices(input_BCpp, prev_BCqq, keep=2 / 64)
        worse_BlC = restore_tokens(branch(gather_tokens(to_tokens(input_BCpp), idx_Bk)), idx_Bk,
                                   branch(to_tokens(prev_BCqq)), side=8)
    assert not torch.allclose(worse_BlC[:, 40], full_BlC[:, 40])


def test_keeping_everything_is_the_identity():
    g = torch.Generator().manual_seed(3)
    x_BlC = torch.randn(2, 16, 4, generator=g)
    idx_Bk = pivotal_indices(torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g), keep=1.0)
    assert idx_Bk.tolist() == [list(range(16))] * 2
    assert torch.equal(restore_tokens(gather_tokens(x_BlC, idx_Bk), idx_Bk, torch.randn(2, 4, 4), 4), x_BlC)


def test_bf16_tokens_keep_their_dtype():
    out = restore_tokens(torch.ones(1, 2, 4, dtype=torch.bfloat16), torch.tensor([[0, 3]]), torch.zeros(1, 1, 4), 2)
    assert out.dtype == torch.bfloat16 and out[0, 1].abs().sum() == 0 and out[0, 3].sum() == 4


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, "half", None])
def test_bad_keep_fractions_fail_clearly(keep):
    with pytest.raises(ValueError, match="kept fraction"):
        pruned_scales(SCALES_1024, keep)


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="must be smaller"):
        pivotal_indices(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="same B and C"):
        pivotal_indices(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2, 2), 0.5)
    with pytest.raises(ValueError, match="not a square"):
        upsample_tokens(torch.zeros(1, 10, 2), 4)
    with pytest.raises(ValueError, match="disagree"):
        restore_tokens(torch.zeros(1, 3, 2), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 4, 2), 4)
