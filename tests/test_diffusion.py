"""Residual diffusion head against the reference recordings, plus generator semantics."""
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from hart import rng
from hart.models.diffusion import DiffusionHead, guide
from tests.utils import assert_close


def _seed(call: str) -> int:
    return int(re.search(r"manual_seed\((\d+)\)", call).group(1))


def _cfg(call: str) -> float:
    return float(re.search(r"cfg(?:_scale)?=([\d.]+)", call).group(1))


@pytest.fixture(scope="module")
def head(fixtures):
    config = json.loads((fixtures / "ckpt/llm/config.json").read_text())
    weights = load_file(str(fixtures / "ckpt/llm/model.safetensors"))
    state = {k[len("diffloss."):]: v for k, v in weights.items() if k.startswith("diffloss.")}
    head = DiffusionHead(
        latent_channels=state["net.input_proj.weight"].shape[1],
        cond_dim=config["embed_dim"],
        width=config["diff_width"],
        depth=config["diff_depth"],
        num_sampling_steps=config["num_sampling_steps"],
        batch_mul=config["diffusion_batch_mul"],
    )
    head.load_state_dict(state, strict=True)
    return head.eval()


def test_schedule_matches_recording(head, fixtures):
    rec = json.loads((fixtures / "diffloss/gen_diffusion_schedule.json").read_text())
    sched = head.sample_schedule
    assert sched.timesteps.tolist() == rec["timestep_map"]
    assert head.latent_scale == rec["vae_scale"]
    for name in ("betas", "alphas_cumprod", "posterior_log_variance_clipped"):
        torch.testing.assert_close(getattr(sched, name), torch.tensor(rec[name], dtype=torch.float64),
                                   rtol=1e-6, atol=0, msg=name)


def test_state_dict_holds_only_the_network(head):
    assert all(k.startswith("net.") for k in head.state_dict())


@torch.no_grad()
def test_fresh_head_starts_at_zero(head):
    """Training init zeroes the modulation and the final linear, so a new net predicts eps = v = 0."""
    C, D = head.latent_channels, head.net.cond_embed.in_features
    fresh = DiffusionHead(C, D, width=32, depth=2)
    assert torch.equal(fresh.net(torch.randn(5, C), torch.arange(5), torch.randn(5, D)), torch.zeros(5, 2 * C))


@torch.no_grad()
def test_network_outputs(head, recorded):
    rec = recorded("diffloss/net")
    x, t, c = rec["x"], rec["t"], rec["c"]
    assert_close(head.net(x, t, c), rec["net_out"], 1e-5, "net_out")
    assert_close(head.net.time_embed(t), rec["time_embed"], 1e-5, "time_embed")

    # forward_with_cfg feeds the first half of x twice (each half keeps its own t and c) and returns the
    # guided eps for both halves next to each half's own variance value.
    w = _cfg(rec.meta["calls"]["net_out_cfg"])
    half = x.shape[0] // 2
    out = head.net(x[:half].repeat(2, 1), t, c)
    eps, v_cond = guide(out, w)
    C = head.latent_channels
    # Guidance multiplies the network's float32 rounding (~5e-6 here) by up to 1 + 2w.
    tol = 1e-5 * (1 + 2 * w)
    assert_close(eps, rec["net_out_cfg"][:half, :C], tol, "guided eps (cond half)")
    assert_close(eps, rec["net_out_cfg"][half:, :C], tol, "guided eps (uncond half)")
    assert_close(v_cond, rec["net_out_cfg"][:half, C:], 1e-5, "v (cond half)")
    assert_close(out[half:, C:], rec["net_out_cfg"][half:, C:], 1e-5, "v (uncond half)")


def test_sample_guided(head, recorded):
    rec = recorded("diffloss/sample")
    call = rec.meta["calls"]["sample_cfg"]
    z = rec["z"]
    n = z.shape[0] // 2  # the reference's batch is [cond; uncond]
    seed = _seed(call)
    noise = rng.randn((2, n // 2, head.latent_channels), torch.Generator().manual_seed(seed), "cpu")
    assert_close(noise.flatten(0, 1), rec["sample_cfg_initial_noise"], 0.0, "initial noise")
    out = head.sample(z[:n], z[n:], guidance_scale=_cfg(call), generator=torch.Generator().manual_seed(seed),
                      num_images=2)
    assert_close(out, rec["sample_cfg"][:n], 1e-4, "sample_cfg")


def test_sample_unguided(head, recorded):
    rec = recorded("diffloss/sample")
    z = rec["z"]
    seed = _seed(rec.meta["calls"]["sample_nocfg"])
    noise = rng.randn((1, z.shape[0], head.latent_channels), torch.Generator().manual_seed(seed), "cpu")
    assert_close(noise[0], rec["sample_nocfg_initial_noise"], 0.0, "initial noise")
    # The recording used cfg=1.0, which the reference treats as "no guidance" on all rows of z.
    out = head.sample(z, generator=torch.Generator().manual_seed(seed))
    assert_close(out, rec["sample_nocfg"], 1e-4, "sample_nocfg")


@torch.no_grad()
def test_train_loss_seeded(head, recorded):
    rec = recorded("diffloss/train_loss")
    terms = head.loss(rec["target"], rec["z"], generator=torch.Generator().manual_seed(_seed(rec.meta["description"])))
    assert_close(terms.loss.mean(), rec["loss"], 1e-4, "loss")


@torch.no_grad()
def test_training_forward_terms(head, recorded):
    rec = recorded("transformer_forward/nodrop")
    # The recorded x_start is the target already divided by the latent scale.
    terms = head.loss(rec["diffusion_x_start"] * head.latent_scale, rec["diffusion_c"],
                      t=rec["diffusion_t"], noise=rec["diffusion_noise"])
    assert_close(terms.loss, rec["diffusion_loss_per_sample"], 1e-4, "loss per row")
    assert_close(terms.mse, rec["diffusion_mse"], 1e-4, "mse")
    assert_close(terms.vb, rec["diffusion_vb"], 1e-4, "vb")
    assert_close(terms.loss.mean(), rec["diff_loss"], 1e-4, "diff_loss")


@torch.no_grad()
def test_vb_at_t0_is_decoder_nll(head, recorded):
    """No recording has t == 0: check that branch is the 1/255-bin Gaussian NLL of x0 under the model."""
    rec = recorded("transformer_forward/nodrop")
    # Interior bins only: the edge bins (|x0| > 0.999) are open-ended.
    x0 = rec["diffusion_x_start"][:8].clamp(-0.99, 0.99)
    c, noise = rec["diffusion_c"][:8], rec["diffusion_noise"][:8]
    t = torch.zeros(8, dtype=torch.long)
    terms = head.loss(x0 * head.latent_scale, c, t=t, noise=noise)
    sched = head.train_schedule
    x_t = sched.at(sched.sqrt_alphas_cumprod, t, x0) * x0 + sched.at(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    eps, v = head.net(x_t, t, c).chunk(2, dim=1)
    mean, log_var = sched.p_mean_log_variance(x_t, t, eps, v, clip_x0=False)
    # ADM's tanh approximation of the normal CDF (the tails decide the value at t = 0, so it must match).
    def cdf(u):
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    inv_std = torch.exp(-0.5 * log_var)
    p = cdf(inv_std * (x0 - mean + 1 / 255)) - cdf(inv_std * (x0 - mean - 1 / 255))
    expected = -p.clamp(min=1e-12).log().mean(dim=1) / math.log(2)
    assert_close(terms.vb, expected, 1e-4, "vb at t = 0")
    assert not torch.allclose(terms.vb, head.loss(x0 * head.latent_scale, c, t=t + 1, noise=noise).vb)


@pytest.mark.parametrize("guided", [False, True])
def test_generator_list_matches_single_images(head, recorded, guided):
    z = recorded("diffloss/sample")["z"]
    l = 3
    cond = z[: 2 * l]
    uncond = z[2 * l: 4 * l] if guided else None
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    both = head.sample(cond, uncond, 4.5, generator=generators, num_images=2)
    for i, seed in enumerate((1, 2)):
        rows = slice(i * l, (i + 1) * l)
        alone = head.sample(cond[rows], None if uncond is None else uncond[rows], 4.5,
                            generator=torch.Generator().manual_seed(seed))
        # Batch size changes float32 matmul rounding (a few ulps of the output per sampling step);
        # the steps add up and guidance amplifies it by up to 1 + 2w.
        steps = len(head.sample_schedule.timesteps)
        ulp = torch.finfo(torch.float32).eps * max(1.0, alone.abs().max().item())
        assert_close(both[rows], alone, 2 * ulp * steps * (1 + 2 * 4.5 * guided), f"image {i}")


def test_same_seed_same_output(head, recorded):
    z = recorded("diffloss/sample")["z"]
    a = head.sample(z[:6], z[6:], 4.5, generator=torch.Generator().manual_seed(7))
    b = head.sample(z[:6], z[6:], 4.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_guidance_one_still_guides(head, recorded):
    """The reference silently turns guidance off at exactly 1.0; here the formula always applies."""
    z = recorded("diffloss/sample")["z"]
    cond, uncond = z[:6], z[6:]
    def run(u, w):
        return head.sample(cond, u, w, generator=torch.Generator().manual_seed(3))
    # Same random stream in all three: only the guidance differs.
    assert (run(uncond, 1.0) - run(uncond, 0.0)).abs().max() > 1e-3
    assert_close(run(cond, 1.0), run(uncond, 0.0), 1e-6, "w = 1 with uncond = cond is no guidance")
