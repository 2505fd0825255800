"""The transformer's training forward and objective match the reference (transformer_forward/)."""
import pytest
import torch

from hart import rng
from hart.loading import load_official_tokenizer, load_official_transformer, read_weights
from hart.text import TextConditioning
from hart.training.objective import draw_dropped, draw_kept_tokens, drop_conditions, hart_loss
from tests.utils import assert_close


@pytest.fixture(scope="module")
def models(fixtures):
    return load_official_transformer(fixtures / "ckpt" / "llm"), load_official_tokenizer(fixtures / "ckpt" / "tokenizer")


def test_every_official_key_is_accounted_for(fixtures, models):
    transformer, _ = models
    file_keys = set(read_weights(fixtures / "ckpt" / "llm" / "model.safetensors"))
    model_keys = set(transformer.state_dict())
    renamed = {k.replace("diffloss.", "diffusion_head.", 1) for k in file_keys}
    buffers = {k for k in renamed - model_keys if k in ("lvl_1L", "attn_bias_for_masking") or k.endswith("zero_k_bias")}
    assert renamed - buffers == model_keys


def _reference_case(recorded, models):
    transformer, vae = models
    inp, rec, tok = recorded("transformer_forward/inputs"), recorded("transformer_forward/nodrop"), recorded("tokenizer/tokenizer")
    S = len(transformer.patch_nums)
    gt_idx = [tok[f"idx_s{i}"] for i in range(S)]
    assert torch.equal(gt_idx[-1], inp["last_layer_gt_discrete"])
    B = inp["context"].shape[0]
    batch, token = rec["mask_wo_prev_stages_batch"], rec["mask_wo_prev_stages_token"]
    keep_idx_BK = torch.stack([token[batch == b].sort().values for b in range(B)])
    cond = TextConditioning(inp["context"], inp["context_mask"], inp["context_position_ids"])
    return transformer, vae, inp, rec, gt_idx, cond, keep_idx_BK


def test_teacher_forcing_input_matches_reference(recorded, models):
    transformer, vae, inp, _, gt_idx, _, _ = _reference_case(recorded, models)
    x = vae.quantize.teacher_forcing_input(gt_idx, transformer.patch_nums)
    assert_close(x, inp["x_BLCv_wo_first_l"], 1e-4, "x_BLCv_wo_first_l")


def test_training_forward_and_loss_match_reference(recorded, models):
    transformer, vae, inp, rec, gt_idx, cond, keep_idx_BK = _reference_case(recorded, models)
    B = cond.batch_size
    with torch.no_grad():
        out = hart_loss(
            transformer, vae.quantize, cond, inp["x_BLCv_wo_first_l"], gt_idx, inp["last_layer_gt"],
            keep_idx_BK=keep_idx_BK, drop_B=torch.zeros(B, dtype=torch.bool),
            sampled_idx_BK=rec["idx_BL_sampled"], diffusion_t=rec["diffusion_t"], diffusion_noise=rec["diffusion_noise"],
        )
        assert_close(out.logits_BLV, rec["logits"], 1e-4, "logits")
        assert_close(out.diffusion_loss, rec["diff_loss"], 1e-4, "diff_loss")
        _, hidden_BKC = transformer(cond.features_BTC, cond.mask_BT, cond.position_ids_BT, inp["x_BLCv_wo_first_l"], keep_idx_BK)
        code = vae.quantize.embedding.weight[rec["idx_BL_sampled"]]
        assert_close(transformer.diffusion_condition(hidden_BKC, code), rec["last_layer_cond"], 1e-4, "last_layer_cond")


def test_padding_features_reach_the_output_as_released(recorded, models):
    """The release attends over every text token and max-pools them, padding included (no padding
    mask), so the text features at padding positions are part of the condition: the text parity test
    compares them wherever the text model defines them."""
    transformer, _ = models
    inp = recorded("transformer_forward/inputs")
    pad_BT = ~inp["context_mask"]
    assert pad_BT.any(), "the fixture prompts fill every text position: nothing to check"
    garbage = inp["context"].clone()
    garbage[pad_BT] = 3 * torch.randn(garbage[pad_BT].shape, generator=torch.Generator().manual_seed(0))
    run = lambda context: transformer(context, inp["context_mask"], inp["context_position_ids"], inp["x_BLCv_wo_first_l"])[0]
    with torch.no_grad():
        assert not torch.allclose(run(inp["context"]), run(garbage), atol=1e-3)


def test_objective_draws_come_from_the_generator(recorded, models):
    transformer, vae, inp, _, gt_idx, cond, _ = _reference_case(recorded, models)
    run = lambda seed: hart_loss(
        transformer, vae.quantize, cond, inp["x_BLCv_wo_first_l"], gt_idx, inp["last_layer_gt"],
        generator=torch.Generator().manual_seed(seed),
    ).loss
    with torch.no_grad():
        a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_condition_dropout_rate_is_the_configured_rate():
    g = torch.Generator().manual_seed(0)
    drops = torch.cat([draw_dropped(1000, 0.1, g, "cpu") for _ in range(20)])
    assert abs(drops.float().mean().item() - 0.1) < 0.01


def test_kept_tokens_keep_at_least_32():
    g = torch.Generator().manual_seed(0)
    assert draw_kept_tokens(2, 16, g, "cpu").shape == (2, 16)
    keep = draw_kept_tokens(3, 1024, g, "cpu")
    assert 32 <= keep.shape[1] <= 512 and bool((keep.diff(dim=1) > 0).all())


def test_package_layout_round_trip_is_exact(recorded, models, tmp_path):
    transformer, vae, inp, _, gt_idx, cond, keep_idx_BK = _reference_case(recorded, models)
    transformer.save_pretrained(tmp_path)
    loaded = type(transformer).from_pretrained(tmp_path).eval()
    args = (cond.features_BTC, cond.mask_BT, cond.position_ids_BT, inp["x_BLCv_wo_first_l"], keep_idx_BK)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(transformer(*args), loaded(*args)))


def test_unsupported_official_variants_are_refused(fixtures, tmp_path):
    import json
    import shutil

    from hart.loading import CheckpointError

    folder = tmp_path / "llm"
    shutil.copytree(fixtures / "ckpt" / "llm", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "attn_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="attn_type"):
        load_official_transformer(folder)


def test_ema_weights_are_used_when_present_and_bin_files_load(fixtures, tmp_path):
    import shutil

    folder = tmp_path / "llm"
    shutil.copytree(fixtures / "ckpt" / "llm", folder)
    state = read_weights(folder / "model.safetensors")
    ema = {k: v + 1 if k == "head.bias" else v for k, v in state.items()}
    torch.save(ema, folder / "ema_model.bin")
    assert torch.equal(load_official_transformer(folder).head.bias, state["head.bias"] + 1)
    assert torch.equal(load_official_transformer(folder, use_ema=False).head.bias, state["head.bias"])
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert torch.equal(load_official_transformer(folder, use_ema=False).head.bias, state["head.bias"])


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickles_that_run_code_are_refused(tmp_path, monkeypatch):
    from hart.loading import CheckpointError

    monkeypatch.chdir(tmp_path)
    torch.save({"w": _Exploit()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="evil.bin"):
        read_weights(tmp_path / "evil.bin")
    assert not (tmp_path / "PWNED").exists()


def test_config_that_disagrees_with_the_weights_names_the_keys(fixtures, tmp_path):
    import json
    import shutil

    from hart.loading import CheckpointError

    folder = tmp_path / "llm"
    shutil.copytree(fixtures / "ckpt" / "llm", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "depth": cfg["depth"] + 1}))
    with pytest.raises(CheckpointError, match=rf"missing keys: blocks\.{cfg['depth']}\."):
        load_official_transformer(folder)


def test_prior_distillation_compares_the_model_with_its_adapters_off(recorded, fixtures):
    import copy

    from hart.training.lora import adapters_off, add_lora, base_model_kl

    base = load_official_transformer(fixtures / "ckpt" / "llm")
    tok = load_official_tokenizer(fixtures / "ckpt" / "tokenizer")
    tuned, vae, inp, rec, gt_idx, cond, keep_idx_BK = _reference_case(recorded, (copy.deepcopy(base), tok))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        add_lora(tuned, rank=2, alpha=2, groups=("attention", "head"))
    B = cond.batch_size
    loss = lambda: hart_loss(tuned, vae.quantize, cond, inp["x_BLCv_wo_first_l"], gt_idx, inp["last_layer_gt"],
                             keep_idx_BK=keep_idx_BK, drop_B=torch.tensor([True] + [False] * (B - 1)),
                             sampled_idx_BK=rec["idx_BL_sampled"], diffusion_t=rec["diffusion_t"],
                             diffusion_noise=rec["diffusion_noise"])
    prior_B = torch.tensor([True] * (B - 1) + [False])
    zero = base_model_kl(tuned, cond, inp["x_BLCv_wo_first_l"], loss(), prior_B)
    assert zero.abs().max() < 1e-6 and zero[-1] == 0  # fresh adapters (B = 0) change nothing
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    out = loss()
    kl_B = base_model_kl(tuned, cond, inp["x_BLCv_wo_first_l"], out, prior_B)
    assert (kl_B[:-1] > 0).all() and kl_B[-1] == 0  # only the prior rows
    # the base model read the same inputs (the first row's dropped condition included)
    dropped = drop_conditions(cond, out.drop_B)
    with torch.no_grad():
        want, _ = base(*dropped, inp["x_BLCv_wo_first_l"], keep_idx_BK)
    expected = torch.nn.functional.kl_div(out.logits_BLV.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1).mean(-1)
    assert_close(kl_B[:-1], expected[:-1].detach(), 1e-5, "kl")
    kl_B.sum().backward()
    lora = [p for n, p in tuned.named_parameters() if "lora_" in n]
    assert all(p.grad is not None for p in lora) and any(p.grad.abs().sum() > 0 for p in lora)
    assert all(not p.requires_grad for n, p in tuned.named_parameters() if "lora_" not in n)
    with pytest.raises(RuntimeError), adapters_off(tuned):
        raise RuntimeError("inside")
    assert all(not m._disable_adapters for m in tuned.modules() if hasattr(m, "_disable_adapters"))  # back on
