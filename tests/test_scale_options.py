"""The scale loop's speed options: exact text-key compaction and cached token pruning."""
import pytest
import torch

from hart.loading import load_official_tokenizer, load_official_transformer
from hart.models.attention import KVCache
from hart.pruning import BranchCache, num_kept, pruned_scales
from hart import rng, sampling
from hart.sampling import ForcedTokens, SamplingOptions, sample_scales
from hart.text import TextConditioning
from tests.utils import assert_close, fixture_sizes


@pytest.fixture(scope="module")
def models(fixtures):
    return load_official_transformer(fixtures / "ckpt" / "llm"), load_official_tokenizer(fixtures / "ckpt" / "tokenizer")


@pytest.fixture(scope="module")
def cond(recorded):
    inputs = recorded("generation/inputs")
    return TextConditioning(inputs["label_B"][:2], inputs["context_mask"][:2], inputs["context_position_ids"][:2])


def _sample(models, cond, seed=0, **options):
    transformer, vae = models
    return sample_scales(transformer, vae.quantize, cond, guidance_scale=4.5,
                         generator=torch.Generator().manual_seed(seed), **options)


def test_compacted_text_gives_the_same_latent(models, cond):
    assert cond.mask_BT.sum(1).max() < cond.mask_BT.shape[1]  # the fixture prompts are padded
    full = _sample(models, cond, compact_text=False)
    compact = _sample(models, cond, compact_text=True)
    # Merging the padding keys changes the attention's sums, hence float rounding, which the residual
    # diffusion carries into f_hat (|f_hat| up to 3): 1.2e-4 measured on an AVX-512 Xeon, less on
    # other CPUs. One token drawn differently would move f_hat by about 1 (another seed: 4).
    assert_close(compact, full, 1e-3, "f_hat")


def test_pruning_that_keeps_every_token_changes_nothing(models, cond):
    """With every token pivotal the pruned scales run through gather, restore and the branch cache,
    and must give the unpruned latent: the bookkeeping (indices, RoPE, KV cache) is right."""
    transformer, _ = models
    keep = 0.999
    assert pruned_scales(transformer.patch_nums, keep)
    assert all(num_kept(p, keep) == p * p for p in transformer.patch_nums)
    assert_close(_sample(models, cond, prune=keep), _sample(models, cond), 1e-4, "f_hat")


def test_pruning_forwards_only_the_kept_tokens(models, cond, monkeypatch):
    transformer, _ = models
    pn, keep = transformer.patch_nums, 0.25
    pruned = pruned_scales(pn, keep)
    assert len(pruned) == 2  # the largest scale at 0.25, the one before at 0.5
    seen = []
    original = transformer.blocks[0].attn.forward
    monkeypatch.setattr(transformer.blocks[0].attn, "forward",
                        lambda x, *a, **k: seen.append(x.shape[1]) or original(x, *a, **k))
    latent = _sample(models, cond, prune=keep)
    text_positions = cond.mask_BT.shape[1]
    if fixture_sizes().padding_side == "right":  # text compaction is on by default: trailing pads merge
        assert seen[0] < text_positions
    else:  # leading pads do not merge
        assert seen[0] == text_positions
    assert seen[1:] == [num_kept(p, pruned[si]) if si in pruned else p * p for si, p in enumerate(pn) if si > 0]
    unpruned = _sample(models, cond)
    assert latent.shape == unpruned.shape and torch.isfinite(latent).all()
    assert not torch.equal(latent, unpruned)  # fewer tokens at the largest scales: a different image


def test_a_pruned_last_scale_diffuses_only_at_its_pivotal_tokens(models, cond, monkeypatch):
    """The residual head runs on the pivotal tokens' rows only, and its output lands at their positions
    of the latent; every other token of the last scale keeps its code's embedding (a zero residual)."""
    transformer, _ = models
    P, keep = transformer.patch_nums[-1], 0.25
    rows = []

    def constant_head(value):
        def sample(cond_nD, uncond_nD=None, *args, **kwargs):
            rows.append(len(cond_nD))
            return torch.full((len(cond_nD), transformer.diffusion_head.latent_channels), value)
        return sample

    latents = {}
    for value in (0.0, 5.0):
        monkeypatch.setattr(transformer.diffusion_head, "sample", constant_head(value))
        latents[value] = _sample(models, cond, prune=keep)
    B = cond.batch_size
    assert rows == [B * num_kept(P, keep)] * 2
    added_BL = (latents[5.0] - latents[0.0]).flatten(2).transpose(1, 2)  # the head's output at each position
    diffused_BL = (added_BL - 5.0).abs().amax(-1) < 1e-4
    assert (diffused_BL | (added_BL.abs().amax(-1) < 1e-6)).all()  # 5 where diffused, 0 elsewhere
    assert diffused_BL.sum(1).tolist() == [num_kept(P, keep)] * B


@pytest.mark.parametrize("num_maskgit_iters, prune", [(1, 1.0), (1, 0.25), (2, 1.0)])
def test_the_last_scale_keeps_nothing_it_needs_no_more(models, cond, monkeypatch, num_maskgit_iters, prune):
    """In one step the last scale's keys and values are attended to but never stored, and the pruning
    cache drops each recorded output once restored from: memory, not values (the parity tests)."""
    transformer, _ = models
    made = {}
    for cls in (KVCache, BranchCache):
        monkeypatch.setattr(cls, "__init__", _spy(cls.__init__, made))
    _sample(models, cond, prune=prune, num_maskgit_iters=num_maskgit_iters, compact_text=False)
    pn, pruned = transformer.patch_nums, pruned_scales(transformer.patch_nums, prune)
    stored = cond.mask_BT.shape[1] + sum(num_kept(p, pruned[si]) if si in pruned else p * p
                                         for si, p in enumerate(pn[:-1]) if si > 0)
    if num_maskgit_iters > 1:
        stored += pn[-1] ** 2
    assert made[KVCache].len == [stored] * len(transformer.blocks)
    if prune < 1:
        assert made[BranchCache].outputs == {}


def test_the_bf16_cache_stores_half_and_reads_back_in_the_model_dtype():
    cache = KVCache(depth=1, max_len=8, dtype=torch.bfloat16)
    k_BHld, v_BHld = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    k, v = cache.extend(0, k_BHld, v_BHld)
    assert cache.k[0].dtype == cache.v[0].dtype == torch.bfloat16 and k.dtype == v.dtype == torch.float32
    assert torch.equal(k, k_BHld.bfloat16().float()) and torch.equal(v, v_BHld.bfloat16().float())
    cache.keep_new = False  # the last scale: attended to, not stored, and not rounded
    k, _ = cache.extend(0, k_BHld[:, :, :2], v_BHld[:, :, :2])
    assert k.dtype == torch.float32 and torch.equal(k[:, :, 5:], k_BHld[:, :, :2]) and cache.len == [5]
    branches = BranchCache(record_from=0, dtype=torch.bfloat16)
    branches.start_scale(2, None)
    out_BlC = branches.run((0, "attn"), torch.randn(2, 4, 3), lambda h: h * 2)
    assert out_BlC.dtype == torch.float32 and branches.outputs[0, "attn"].dtype == torch.bfloat16


def test_the_bf16_cache_changes_the_latent_by_rounding_only(models, cond, monkeypatch):
    """Same tokens (forced from the fp32-cache run): what is left is the rounding of the keys, values and
    recorded branch outputs, carried into the residual diffusion; and every cache is stored in bf16."""
    transformer, _ = models
    tokens = []
    full = sample_scales(*_pair(models), cond, guidance_scale=4.5, more_smooth=False, prune=0.5,
                         generator=torch.Generator().manual_seed(0), callback=lambda stage: tokens.append(stage.idx_Bl))
    made = {}
    for cls in (KVCache, BranchCache):
        monkeypatch.setattr(cls, "__init__", _spy(cls.__init__, made))
    half = sample_scales(*_pair(models), cond, guidance_scale=4.5, more_smooth=False, prune=0.5, bf16_cache=True,
                         generator=torch.Generator().manual_seed(0), forced=ForcedTokens(idx=tokens))
    assert {t.dtype for t in made[KVCache].k} == {torch.bfloat16} and made[BranchCache].dtype == torch.bfloat16
    assert 0 < (half - full).abs().max() < 0.05  # 0.02 measured; a token drawn differently moves it by about 1


def _pair(models):
    transformer, vae = models
    return transformer, vae.quantize


def _spy(init, made):
    def spying_init(self, *args, **kwargs):
        made[type(self)] = self
        init(self, *args, **kwargs)
    return spying_init


@pytest.mark.parametrize("settings, message", [
    (dict(prune=0.0), "prune"), (dict(prune=1.5), "prune"), (dict(prune=True), "prune"),
    (dict(prune="0.5"), "prune"),
    (dict(compact_text=1), "compact_text"), (dict(bf16_cache="yes"), "bf16_cache"),
])
def test_bad_speed_options_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**settings)


def test_pruning_under_maskgit_leaves_the_last_scale_whole(models, cond, monkeypatch):
    transformer, _ = models
    pn, keep = transformer.patch_nums, 0.25
    seen = []
    original = transformer.blocks[0].ffn.forward
    monkeypatch.setattr(transformer.blocks[0].ffn, "forward", lambda x: seen.append(x.shape[1]) or original(x))
    _sample(models, cond, prune=keep, num_maskgit_iters=2)
    assert seen[len(pn) - 2] == num_kept(pn[-2], 2 * keep)  # the second largest scale is pruned
    assert sum(seen[len(pn) - 1:]) == pn[-1] ** 2  # the last scale's MaskGIT steps forward every token once


def test_generate_flags_reach_the_pipeline_and_the_metadata(fixtures, tmp_path, capsys):
    import json

    from PIL import Image

    from hart.cli import main
    from hart.cli_args import METADATA_KEY
    from hart.device import auto_dtype

    model = ["--model", str(fixtures / "ckpt"), "--text-encoder", str(fixtures / "ckpt" / "text_encoder")]
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--prune", "--no-compact-text", "--bf16-cache", "--dtype", "auto", "--device",
                 "cpu", "--out", str(out), *model]) == 0
    said = capsys.readouterr()
    assert f"--dtype auto: {auto_dtype('cpu').reason}" in said.out and "--dtype auto" not in said.err
    meta = json.loads(Image.open(out / "00000_00.png").text[METADATA_KEY])
    assert (meta["prune"], meta["compact_text"], meta["bf16_cache"], meta["dtype"], meta["int8"]) == (
        0.25, False, True, auto_dtype("cpu").name, False)
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(out / "00000_00.png"), "--out", str(again)]) == 0
    assert Image.open(again / "00000_00.png").tobytes() == Image.open(out / "00000_00.png").tobytes()
    assert main(["generate", "a cat", "--prune", "0", "--out", str(tmp_path / "bad"), *model]) == 2
    assert "--prune" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_int8_flag_quantizes_or_names_the_missing_extra(fixtures, tmp_path, capsys):
    import importlib.util
    import json

    from PIL import Image

    from hart.cli import main
    from hart.cli_args import METADATA_KEY

    model = ["--model", str(fixtures / "ckpt"), "--text-encoder", str(fixtures / "ckpt" / "text_encoder")]
    out = tmp_path / "out"
    status = main(["generate", "a cat", "--int8", "--device", "cpu", "--out", str(out), *model])
    if importlib.util.find_spec("torchao") is None:
        assert status == 2 and "--int8: int8 weights need torchao: pip install" in capsys.readouterr().err
    else:
        assert status == 0 and json.loads(Image.open(out / "00000_00.png").text[METADATA_KEY])["int8"] is True


def test_cli_defaults_are_the_library_defaults():
    """cli_args keeps its own copies (`hart --help` imports no torch): they must not drift."""
    from hart.cli_args import DEFAULT_PRUNE_KEEP, SAMPLING_DEFAULTS
    from hart.pruning import DEFAULT_KEEP

    defaults = SamplingOptions()
    assert [SAMPLING_DEFAULTS[k] for k in ("prune", "compact_text", "bf16_cache")] == [
        defaults.prune, defaults.compact_text, defaults.bf16_cache]
    assert DEFAULT_PRUNE_KEEP == DEFAULT_KEEP


@pytest.mark.parametrize("options", [dict(more_smooth=False), dict(more_smooth=True, prune=0.5),
                                     dict(compact_text=False, num_maskgit_iters=2)])
def test_guidance_zero_skips_the_unconditional_rows(models, cond, monkeypatch, options):
    """At guidance 0 the transformer and the diffusion head run the conditional rows only, and the
    latent is the one the doubled computation gives (same random draws, float rounding at most)."""
    transformer, _ = models
    rows, head_rows = [], []
    attn, sample = transformer.blocks[0].attn.forward, transformer.diffusion_head.sample
    monkeypatch.setattr(transformer.blocks[0].attn, "forward",
                        lambda x, *a, **k: rows.append(x.shape[0]) or attn(x, *a, **k))
    monkeypatch.setattr(transformer.diffusion_head, "sample", lambda c, u=None, *a, **k:
                        head_rows.append(len(c) + (0 if u is None else len(u))) or sample(c, u, *a, **k))

    def run(seed):
        rows.clear(), head_rows.clear()
        return sample_scales(transformer, models[1].quantize, cond, guidance_scale=0.0,
                             generator=torch.Generator().manual_seed(seed), **options)

    skipped = run(0)
    B, L = cond.batch_size, num_kept(transformer.patch_nums[-1], options.get("prune", 1.0))  # pruned: pivotal tokens
    assert set(rows) == {B} and sum(head_rows) == B * L
    monkeypatch.setattr(sampling, "runs_unconditional_rows", lambda *a: True)
    doubled = run(0)
    assert set(rows) == {2 * B} and sum(head_rows) == 2 * B * L
    assert_close(skipped, doubled, 1e-4, "f_hat")
    assert (skipped - run(1)).abs().max() > 1e-3  # the seed matters: the comparison can fail


def test_diffusion_head_guided_noise_without_unconditional_rows(models):
    """`guided_noise` draws a guided call's noise: at guidance 0 the conditional rows alone give the
    guided call's residuals."""
    head = models[0].diffusion_head
    z = torch.randn(2, 6, head.net.cond_embed.in_features, generator=torch.Generator().manual_seed(0))

    def run(*args, **kwargs):
        return head.sample(*args, generator=torch.Generator().manual_seed(5), num_images=2, **kwargs)

    doubled = run(z[0], z[1], 0.0)
    assert_close(run(z[0], None, 0.0, guided_noise=True), doubled, 1e-6, "residual")
    assert (run(z[0], None, 0.0) - doubled).abs().max() > 1e-3  # other noise without guided_noise


def _forced_half(cond, transformer, seed=3):
    """Tokens forced at half the positions of every scale but the first (an edit pipeline's shape)."""
    g, B = torch.Generator().manual_seed(seed), cond.batch_size
    pn, V = transformer.patch_nums, transformer.config.vocab_size
    idx = [None] + [torch.randint(V, (B, p * p), generator=g) for p in pn[1:]]
    mask = [None] + [torch.rand(B, p * p, generator=g) < 0.5 for p in pn[1:]]
    return ForcedTokens(idx=idx, mask=mask)


def test_soft_codes_only_at_free_positions_leave_the_latent_unchanged(models, cond, monkeypatch):
    """Gumbel noise becomes soft codes only where tokens are not forced; the Exp(1) draws still cover
    every position, so the random stream and the latent are those of computing them everywhere."""
    transformer, _ = models
    forced = _forced_half(cond, transformer)
    soft_rows = []
    soft = sampling._soft_codes
    monkeypatch.setattr(sampling, "_soft_codes", lambda logits, *a: soft_rows.append(logits.shape[0]) or soft(logits, *a))
    skipped = _sample(models, cond, more_smooth=True, forced=forced)
    free = sum(int((~m).sum()) for m in forced.mask[1:]) + cond.batch_size  # scale 0: nothing forced
    assert sum(soft_rows) == free
    draw = sampling._draw_tokens
    monkeypatch.setattr(sampling, "_draw_tokens", lambda logits, known, **kw: draw(logits, None, **kw))
    everywhere = _sample(models, cond, more_smooth=True, forced=forced)
    assert_close(skipped, everywhere, 1e-5, "f_hat")  # the soft-code matmul over fewer rows: rounding
    assert not torch.equal(skipped, _sample(models, cond, seed=1, more_smooth=True, forced=forced))


def test_no_gumbel_draws_without_more_smooth(models, cond, monkeypatch):
    draws = []
    exponential = rng.exponential
    monkeypatch.setattr(rng, "exponential", lambda *a, **k: draws.append(a[0]) or exponential(*a, **k))
    _sample(models, cond, more_smooth=False)
    assert draws == []
    _sample(models, cond, more_smooth=True)
    assert len(draws) == len(models[0].patch_nums)
