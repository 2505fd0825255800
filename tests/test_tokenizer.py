"""Hybrid tokenizer: parity with the official implementation's recorded outputs, plus error handling.

Every size and the scale schedule come from the fixture's own files, so any fixture set works.
"""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hart.loading import (
    OFFICIAL_TOKENIZER_TOLERATED,
    CheckpointError,
    load_checked,
    load_official_tokenizer,
    official_tokenizer_state_dict,
    read_weights,
    tokenizer_config_from_official,
)
from hart.models.quantizer import MultiScaleQuantizer, area_down, bicubic_up, phi_ticks
from hart.models.tokenizer import HybridTokenizer, Upsample
from tests.utils import assert_close

ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt_dir(fixtures):
    return fixtures / "ckpt" / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer(ckpt_dir):
    return load_official_tokenizer(ckpt_dir)


@pytest.fixture(scope="module")
def rec(recorded):
    return recorded("tokenizer/tokenizer")


@pytest.fixture(scope="module")
def patch_nums(rec, tokenizer):
    pn = tuple(rec.meta["patch_nums"])
    assert pn == tuple(tokenizer.config.patch_nums)
    return pn


@pytest.fixture(scope="module")
def encoded(tokenizer, rec, patch_nums):
    with torch.no_grad():
        f = tokenizer.encode_latent(rec["input_images"])
        idx_list, residual = tokenizer.quantize.encode(f, patch_nums)
    return f, idx_list, residual


# ------------------------------------------------------------------ loading
def test_every_official_key_accounted_for(tokenizer, ckpt_dir):
    raw = read_weights(ckpt_dir / "model.safetensors")
    assert all(k.startswith(("vae.", "disc.")) for k in raw)
    converted = official_tokenizer_state_dict(raw)
    assert len(converted) == sum(k.startswith("vae.") for k in raw)
    model_sd = tokenizer.state_dict()
    tolerated = {k for k in converted if k not in model_sd}
    assert tolerated == {"quantize.ema_vocab_hit_SV"}
    assert set(converted) - tolerated == set(model_sd)
    for k, v in model_sd.items():
        assert torch.equal(v, converted[k]), k
    assert not tokenizer.training and tokenizer.dtype == torch.float32


def test_config_read_from_checkpoint(tokenizer, ckpt_dir):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    assert tokenizer.config.vocab_size == cfg["vocab_size"]
    assert tokenizer.config.latent_channels == cfg["z_channels"]
    assert tuple(tokenizer.config.channel_multipliers) == tuple(cfg["ch_mult"])
    assert tokenizer.downsample_factor == 2 ** (len(cfg["ch_mult"]) - 1)


@pytest.mark.parametrize("share", [0, 1, 3])
def test_every_phi_sharing_mode_loads(tmp_path, share):
    # A small official-style folder: one phi per scale (0), fully shared (1), partially shared (3).
    cfg = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=[1, 2], v_patch_nums=[1, 2], share_quant_resi=share,
               quantizer_type="var_hybrid")
    src = HybridTokenizer(**tokenizer_config_from_official(cfg))

    def official(k):
        if not k.startswith("quantize.phi."):
            return k
        i, rest = k[len("quantize.phi."):].split(".", 1)
        return {0: f"quantize.quant_resi.{i}.", 1: "quantize.quant_resi.qresi."}.get(
            share, f"quantize.quant_resi.qresi_ls.{i}.") + rest
    sd = {"vae." + official(k): v.contiguous() for k, v in src.state_dict().items()}
    save_file({**sd, "vae.quantize.ema_vocab_hit_SV": torch.zeros(2, 16), "disc.main.0.weight": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_official_tokenizer(tmp_path).state_dict()
    assert sum(k.startswith("quantize.phi.") for k in loaded) == 2 * {0: 2, 1: 1}.get(share, share)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_bin_checkpoint_loads_the_same(tokenizer, ckpt_dir, tmp_path, rec):
    shutil.copy(ckpt_dir / "config.json", tmp_path / "config.json")
    torch.save({"state_dict": read_weights(ckpt_dir / "model.safetensors")}, tmp_path / "pytorch_model.bin")
    other = load_official_tokenizer(tmp_path)
    x = rec["input_images"]
    with torch.no_grad():
        assert torch.equal(other.encode_latent(x), tokenizer.encode_latent(x))


# ------------------------------------------------------------------ parity
def test_encoder_features(tokenizer, rec, encoded):
    with torch.no_grad():
        assert_close(tokenizer.encoder(rec["input_images"]), rec["encoder_features"], ATOL, "encoder_features")
    assert_close(encoded[0], rec["quant_conv_features"], ATOL, "quant_conv_features")


def test_hybrid_and_var_indices(tokenizer, rec, encoded, patch_nums):
    f, idx_list, _ = encoded
    var_idx = tokenizer.quantize.encode_var(f, patch_nums)
    assert len(idx_list) == len(var_idx) == len(patch_nums)
    for si, (idx, vidx) in enumerate(zip(idx_list, var_idx)):
        assert torch.equal(idx, rec[f"idx_s{si}"]), f"idx_s{si}"
        assert torch.equal(vidx, rec[f"var_idx_s{si}"]), f"var_idx_s{si}"


def test_continuous_residual(tokenizer, rec, encoded):
    _, idx_list, residual = encoded
    assert_close(residual, rec["residual_continuous"], ATOL, "residual_continuous")
    frest_last = residual + tokenizer.quantize.embedding(idx_list[-1])
    assert_close(frest_last, rec["frest_last"], ATOL, "frest_last")


def test_teacher_forcing_input(tokenizer, rec, patch_nums):
    idx_list = [rec[f"idx_s{si}"] for si in range(len(patch_nums))]
    with torch.no_grad():
        x = tokenizer.quantize.teacher_forcing_input(idx_list, patch_nums)
    assert x.dtype == torch.float32
    assert_close(x, rec["x_BLCv_wo_first_l"], ATOL, "x_BLCv_wo_first_l")


def test_fhat_per_scale_and_decode(tokenizer, rec, patch_nums):
    q, S = tokenizer.quantize, len(patch_nums)
    idx_list = [rec[f"idx_s{si}"] for si in range(S)]
    residual = rec["residual_continuous"]
    with torch.no_grad():
        f_hat = torch.zeros_like(rec["f_hat_discrete"])
        for si in range(S - 1):
            f_hat, nxt = q.next_scale_input(si, patch_nums, f_hat, q.embed(idx_list[si]))
            assert nxt.shape[-1] == patch_nums[si + 1]
            assert_close(f_hat, rec[f"f_hat_after_s{si}"], ATOL, f"f_hat_after_s{si}")
        f_disc = q.idx_to_fhat(idx_list, patch_nums)
        f_hyb = q.idx_to_fhat(idx_list, patch_nums, residual)
        assert_close(f_disc, rec[f"f_hat_after_s{S - 1}"], ATOL, f"f_hat_after_s{S - 1}")
        assert_close(f_disc, rec["f_hat_discrete"], ATOL, "f_hat_discrete")
        assert_close(f_hyb, rec["f_hat_hybrid"], ATOL, "f_hat_hybrid")
        assert_close(tokenizer.tokens_to_img(idx_list), rec["decoded_discrete"], ATOL, "decoded_discrete")
        assert_close(tokenizer.tokens_to_img(idx_list, residual), rec["decoded_hybrid"], ATOL, "decoded_hybrid")


def test_next_scale_input_does_not_mutate(tokenizer, patch_nums):
    q, P = tokenizer.quantize, patch_nums[-1]
    f_hat = torch.zeros(1, q.Cvae, P, P)
    h = q.embed(torch.zeros(1, patch_nums[0] ** 2, dtype=torch.long))
    with torch.no_grad():
        q.next_scale_input(0, patch_nums, f_hat, h)
    assert not f_hat.any()
    with pytest.raises(ValueError, match="si="):
        q.next_scale_input(len(patch_nums) - 1, patch_nums, f_hat, h)


def test_training_forward(tokenizer, rec, patch_nums):
    x = rec["input_images"]
    out, vq_loss, hits_SV = tokenizer(x, skip_continuous=False)
    assert_close(out, rec["forward_out"], ATOL, "forward_out")
    assert_close(vq_loss, rec["forward_vq_loss"], ATOL, "forward_vq_loss")
    assert hits_SV.shape == (len(patch_nums), tokenizer.config.vocab_size)
    assert hits_SV.sum(1).tolist() == [x.shape[0] * p * p for p in patch_nums]
    out.mean().backward()  # straight-through: the encoder gets gradients
    assert tokenizer.encoder.conv_in.weight.grad is not None
    tokenizer.zero_grad(set_to_none=True)
    # Discrete-only training path applies phi at the last scale too: the plain VAR reconstruction.
    with torch.no_grad():
        out_disc, _, _ = tokenizer(x, skip_continuous=True)
    assert_close(out_disc.clamp(-1, 1), rec["var_reconstructed_last"], ATOL, "var_reconstructed_last")


# ------------------------------------------------------------------ quantizer pieces
def test_phi_index_tables():
    q = MultiScaleQuantizer(8, 4, num_phi=4)
    assert [q.phi_index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [q.phi_index(si, 14) for si in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert q.phi_index(0, 1) == 0
    assert {MultiScaleQuantizer(8, 4, num_phi=1).phi_index(si, 10) for si in range(10)} == {0}


def test_phi_ticks_are_numpy_linspace():
    np = pytest.importorskip("numpy")
    for K in range(1, 20):
        d = 3 * K if K == 4 else 2 * K
        assert phi_ticks(K) == np.linspace(1 / d, 1 - 1 / d, K).tolist(), K


def test_phi_identity_when_ratio_zero():
    q = MultiScaleQuantizer(8, 4, num_phi=4, phi_ratio=0.0)
    h = torch.randn(2, 4, 3, 3)
    assert len(q.phi) == 0 and q.apply_phi(h, 1, 4) is h


def test_resampling_helpers_match_interpolate():
    pns = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
    g = torch.Generator().manual_seed(0)
    for P in pns:
        f = torch.randn(2, 3, P, P, generator=g)
        for p in pns:
            if p > P:
                break
            assert torch.equal(area_down(f, p), F.interpolate(f, size=(p, p), mode="area")), (p, P)
            h = torch.randn(2, 3, p, p, generator=g)
            ref = F.interpolate(h, size=(P, P), mode="bicubic", align_corners=False)
            assert_close(bicubic_up(h, P), ref, 1e-6, f"bicubic {p}->{P}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_is_nearest_then_conv(channels_last):
    """The sub-pixel form equals nearest 2x upsampling followed by the 3x3 convolution, on non-square maps,
    in both memory formats, and passes the same gradients to the input and the weights."""
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x, up = x.contiguous(memory_format=torch.channels_last), up.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = up(x)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert out.shape == (2, 6, 10, 14)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(out, ref, 1e-5, "upsample")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, up.conv.weight, up.conv.bias), g)
    ref_grads = torch.autograd.grad(ref, (x, up.conv.weight, up.conv.bias), g)
    for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads):
        assert_close(got, want, 1e-4, f"{name} gradient")


# ------------------------------------------------------------------ save / load round trip
def test_save_pretrained_round_trip(tokenizer, rec, tmp_path, patch_nums):
    tokenizer.save_pretrained(tmp_path)
    other = HybridTokenizer.from_pretrained(tmp_path)
    x = rec["input_images"]
    with torch.no_grad():
        idx_a, res_a = tokenizer.img_to_tokens(x)
        idx_b, res_b = other.img_to_tokens(x)
        assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b))
        assert torch.equal(res_a, res_b)
        assert torch.equal(tokenizer.tokens_to_img(idx_a, res_a), other.tokens_to_img(idx_b, res_b))
    assert tuple(other.config.patch_nums) == patch_nums


# ------------------------------------------------------------------ bad inputs
def test_bad_images(tokenizer):
    d = tokenizer.downsample_factor
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tokenizer.encode_latent(torch.zeros(1, 4, d, d))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tokenizer.encode_latent(torch.zeros(3, d, d))
    with pytest.raises(ValueError, match=f"multiples of {d}"):
        tokenizer.encode_latent(torch.zeros(1, 3, d + d // 2, d))  # not a multiple of d
    with pytest.raises(ValueError, match="latent must be"):
        tokenizer.img_to_tokens(torch.zeros(1, 3, 2 * d, 2 * d), patch_nums=(1, 3))  # latent 2x2, P = 3


def test_missing_and_truncated_weights(ckpt_dir, tmp_path):
    shutil.copy(ckpt_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights file"):
        load_official_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        read_weights(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_official_tokenizer(tmp_path / "absent")
    data = (ckpt_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_official_tokenizer(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value)


def test_unsupported_configs(ckpt_dir):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="quantizer_type 'lfq'"):
        tokenizer_config_from_official({**cfg, "quantizer_type": "lfq"})
    with pytest.raises(CheckpointError, match="double_decoder"):
        tokenizer_config_from_official({**cfg, "double_decoder": True})
    assert tokenizer_config_from_official({**cfg, "quantizer_type": "var"})["num_phi"] == cfg["share_quant_resi"]
    assert tokenizer_config_from_official({**cfg, "share_quant_resi": 0})["num_phi"] == len(cfg["v_patch_nums"])
    with pytest.raises(CheckpointError, match="ch_mult"):
        tokenizer_config_from_official({k: v for k, v in cfg.items() if k != "ch_mult"})


def test_state_dict_problems_are_named(tokenizer):
    sd = dict(tokenizer.state_dict())
    key = "decoder.conv_out.weight"
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.conv_out\.weight") as e:
        load_checked(tokenizer, {k: v for k, v in sd.items() if k != key}, "some/file.safetensors")
    assert "some/file.safetensors" in str(e.value)
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.extra"):
        load_checked(tokenizer, {**sd, "decoder.extra": torch.zeros(1)}, "f")
    with pytest.raises(CheckpointError, match=r"shape mismatches: decoder\.conv_out\.weight \(file \(1,\)"):
        load_checked(tokenizer, {**sd, key: torch.zeros(1)}, "f")
    load_checked(tokenizer, {**sd, "quantize.ema_vocab_hit_SV": torch.zeros(1)}, "f", OFFICIAL_TOKENIZER_TOLERATED)


def test_norm_groups_change_the_grouping_not_the_weights():
    from hart.models.tokenizer import HybridTokenizer

    cfg = dict(vocab_size=16, latent_channels=4, base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
               patch_nums=(1, 2))
    released, narrow = HybridTokenizer(**cfg), HybridTokenizer(**cfg, norm_groups=8)
    assert released.decoder.norm_out.num_groups == 32 and narrow.decoder.norm_out.num_groups == 8
    assert {k: v.shape for k, v in released.state_dict().items()} == {k: v.shape for k, v in narrow.state_dict().items()}
    narrow.load_state_dict(released.state_dict())
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert not torch.allclose(released.encode_latent(x), narrow.encode_latent(x))


def test_patch_size_folds_pixels_into_channels():
    from hart.models.tokenizer import HybridTokenizer

    torch.manual_seed(0)
    vae = HybridTokenizer(vocab_size=16, latent_channels=4, base_channels=16, channel_multipliers=(1, 2),
                          num_res_blocks=1, patch_nums=(1, 2, 4), norm_groups=8, patch_size=4)
    assert vae.downsample_factor == 8
    assert vae.encoder.conv_in.in_channels == 48 and vae.decoder.conv_out.out_channels == 48
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = vae.encode_latent(x)
    assert f.shape == (2, 4, 4, 4)
    idx, residual = vae.img_to_tokens(x)
    assert [t.shape for t in idx] == [(2, 1), (2, 4), (2, 16)] and residual.shape == (2, 16, 4)
    assert vae.tokens_to_img(idx, residual).shape == x.shape
    # the fold is pixel_unshuffle: the first conv sees pixel (1, 2) of each 4 x 4 patch as its channels 6, 22, 38
    seen = []
    vae.encoder.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    vae.encode_latent(x)
    assert seen[0].shape == (2, 48, 8, 8)
    assert torch.equal(seen[0][:, [6, 22, 38], 3, 5], x[:, :, 3 * 4 + 1, 5 * 4 + 2])
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode_latent(torch.zeros(1, 3, 36, 36))
