"""Residual diffusion head: a small AdaLN MLP denoiser plus the IDDPM sampler and training loss.

The head predicts, per last-scale token, the continuous residual the discrete code cannot express. Rows are
tokens; `n` rows of latent width `C` are conditioned on `n` transformer states of width `D`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from hart import rng

NUM_TRAIN_TIMESTEPS = 1000


class TimestepEmbedder(nn.Module):
    """Sinusoid of the original timestep (cos half first), then a two-layer SiLU MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs_F = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t_N.device) / half)
        args_NF = t_N[:, None].float() * freqs_F[None]
        emb_N2F = torch.cat([torch.cos(args_NF), torch.sin(args_NF)], dim=-1)
        return self.mlp(emb_N2F.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y_NW).chunk(3, dim=-1)
        return x_NW + gate * self.mlp(self.in_ln(x_NW) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y_NW).chunk(2, dim=-1)
        return self.linear(self.norm_final(x_NW) * (1 + scale) + shift)


class DiffusionMLP(nn.Module):
    """Denoiser `(x, t, cond) -> [eps, v]`, `v` in [-1, 1] interpolating the log-variance (learned range)."""

    def __init__(self, latent_channels: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(latent_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * latent_channels)
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zeroed modulation makes every block start as the identity and the output as zero.
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x_NC: torch.Tensor, t_N: torch.Tensor, cond_ND: Optional[torch.Tensor],
                cond_NW: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`t_N` may be one timestep for every row; `cond_NW` is `cond_embed(cond_ND)` when a sampler computed it
        once for all its steps (`cond_ND` is then None)."""
        y_NW = self.time_embed(t_N) + (self.cond_embed(cond_ND) if cond_NW is None else cond_NW)
        x_NW = self.input_proj(x_NC)
        for block in self.res_blocks:
            x_NW = block(x_NW, y_NW)
        return self.final_layer(x_NW, y_NW)


def respaced_timesteps(num_sampling_steps: str, total: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Evenly spaced original timesteps, first and last included, rounded with Python's `round`."""
    steps = int(num_sampling_steps)
    if steps < 2:
        raise ValueError(f"num_sampling_steps must be at least 2, got {num_sampling_steps!r}")
    stride = (total - 1) / (steps - 1)
    return [round(k * stride) for k in range(steps)]


class DiffusionSchedule:
    """Cosine-schedule coefficients (float64, CPU) restricted to the kept original `timesteps`.

    Coefficients are indexed by the step k into `timesteps`; the training schedule keeps all 1000, so k == t.

    Plain tensors rather than buffers: they never enter a state dict and `module.half()` cannot round them.
    """

    def __init__(self, timesteps: Sequence[int], total: int = NUM_TRAIN_TIMESTEPS):
        s_T = torch.arange(total + 1, dtype=torch.float64) / total
        alpha_bar_T = torch.cos((s_T + 0.008) / 1.008 * math.pi / 2) ** 2
        base_betas = (1 - alpha_bar_T[1:] / alpha_bar_T[:-1]).clamp(max=0.999)
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.long)
        self.alphas_cumprod = torch.cumprod(1 - base_betas, dim=0)[self.timesteps]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Skipping timesteps merges their betas so each kept step jumps between the kept alpha-bars.
        self.betas = 1 - self.alphas_cumprod / prev
        self.log_betas = torch.log(self.betas)
        posterior_variance = self.betas * (1 - prev) / (1 - self.alphas_cumprod)
        # The first posterior variance is 0; its log is replaced by the next step's to stay finite.
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_coef_x0 = self.betas * prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_coef_xt = (1 - prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()

    def at(self, coef_T: torch.Tensor, k_n: torch.Tensor, like_nC: torch.Tensor) -> torch.Tensor:
        """`coef_T[k]` per row as (n, 1); rounded to float32 first, as the reference multiplies in float32."""
        return coef_T[k_n.cpu()].float().to(like_nC.device, like_nC.dtype)[:, None]

    def p_mean_log_variance(self, x_nC, k_n, eps_nC, v_nC, clip_x0: bool):
        """Mean and log-variance of p(x_{k-1} | x_k) from predicted noise and the learned-range value `v`."""
        frac = (v_nC + 1) / 2
        log_var = frac * self.at(self.log_betas, k_n, x_nC) + (1 - frac) * self.at(
            self.posterior_log_variance_clipped, k_n, x_nC)
        x0_nC = self.at(self.sqrt_recip_alphas_cumprod, k_n, x_nC) * x_nC - self.at(
            self.sqrt_recipm1_alphas_cumprod, k_n, x_nC) * eps_nC
        if clip_x0:
            x0_nC = x0_nC.clamp(-1, 1)
        return self.q_posterior_mean(x0_nC, x_nC, k_n), log_var

    def q_posterior_mean(self, x0_nC, x_nC, k_n):
        return self.at(self.posterior_coef_x0, k_n, x_nC) * x0_nC + self.at(self.posterior_coef_xt, k_n, x_nC) * x_nC


def guide(out_2nC2: torch.Tensor, guidance_scale: float):
    """Guided eps `(1+w) eps_c - w eps_u` and the conditional half's (unguided) variance value.

    `out_2nC2` is the network output on [cond rows; uncond rows]. HART's form, so w = 0 means unguided.
    """
    eps_2nC, v_2nC = out_2nC2.chunk(2, dim=1)
    eps_c, eps_u = eps_2nC.chunk(2, dim=0)
    return (1 + guidance_scale) * eps_c - guidance_scale * eps_u, v_2nC.chunk(2, dim=0)[0]


def _approx_std_normal_cdf(x):
    # The tanh approximation the reference's decoder likelihood uses, kept for loss parity.
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_nll(x0_nC, mean_nC, log_var_nC):
    """-log P(x0) under N(mean, var) integrated over 1/255-wide bins, edge bins open (ADM's 8-bit decoder)."""
    inv_std = torch.exp(-0.5 * log_var_nC)
    cdf_hi = _approx_std_normal_cdf(inv_std * (x0_nC - mean_nC + 1 / 255))
    cdf_lo = _approx_std_normal_cdf(inv_std * (x0_nC - mean_nC - 1 / 255))
    log_p = torch.where(
        x0_nC < -0.999, cdf_hi.clamp(min=1e-12).log(),
        torch.where(x0_nC > 0.999, (1 - cdf_lo).clamp(min=1e-12).log(), (cdf_hi - cdf_lo).clamp(min=1e-12).log()))
    return -log_p


class DiffusionLoss(NamedTuple):
    loss: torch.Tensor  # (n,) mse + vb
    mse: torch.Tensor  # (n,)
    vb: torch.Tensor  # (n,) in bits


class DiffusionHead(nn.Module):
    def __init__(self, latent_channels: int, cond_dim: int, *, width: int = 1024, depth: int = 6,
                 num_sampling_steps: str = "8", batch_mul: int = 4, latent_scale: float = 0.6):
        super().__init__()
        self.latent_channels = latent_channels
        self.batch_mul = batch_mul  # the caller tiles the training rows this many times
        self.latent_scale = latent_scale
        self.net = DiffusionMLP(latent_channels, cond_dim, width, depth)
        self.train_schedule = DiffusionSchedule(range(NUM_TRAIN_TIMESTEPS))
        self.sample_schedule = DiffusionSchedule(respaced_timesteps(num_sampling_steps))

    @torch.no_grad()
    def sample(self, cond_nD: torch.Tensor, uncond_nD: Optional[torch.Tensor] = None, guidance_scale: float = 0.0,
               *, temperature: float = 1.0, generator: rng.Generator = None, num_images: int = 1,
               guided_noise: bool = False) -> torch.Tensor:
        """Residuals (n, C) for n = num_images * tokens rows (image-major); guided when `uncond_nD` is given.

        `guided_noise`: draw a guided call's noise without `uncond_nD`: a sampling call at guidance 0 runs
        the conditional rows only and keeps the guided call's random stream (and images).
        """
        n, C, sched = cond_nD.shape[0], self.latent_channels, self.sample_schedule
        if n % num_images:
            raise ValueError(f"{n} condition rows cannot be split evenly over {num_images} images")
        # the head's own dtype: it may run in bf16 inside an fp32 transformer (hart.device.head_and_decoder_dtype)
        l, device, dtype = n // num_images, cond_nD.device, self.net.input_proj.weight.dtype
        guided = uncond_nD is not None
        guided_noise = guided_noise or guided
        # The condition's embedding is the same at every step, and the timestep the same for every row:
        # both are computed once (5% and 3% of the head's FLOPs at the 0.7B model's sizes).
        cond_NW = self.net.cond_embed((torch.cat([cond_nD, uncond_nD]) if guided else cond_nD).to(dtype))
        x_nC = rng.randn((num_images, l, C), generator, device, dtype).flatten(0, 1)
        for k in reversed(range(len(sched.timesteps))):
            k_n = torch.full((n,), k, dtype=torch.long)
            t_1 = torch.full((1,), int(sched.timesteps[k]), dtype=torch.long, device=device)
            if guided:
                # Both halves see the conditional x: the unconditional half only supplies eps_u.
                eps_nC, v_nC = guide(self.net(x_nC.repeat(2, 1), t_1, None, cond_NW), guidance_scale)
            else:
                eps_nC, v_nC = self.net(x_nC, t_1, None, cond_NW).chunk(2, dim=1)
            if guided_noise:
                # The reference draws noise for all 2n rows; drawing the same keeps one generator's stream in step.
                noise_nC = rng.randn((2, num_images, l, C), generator, device, dtype, batch_dim=1)[0].flatten(0, 1)
            else:
                noise_nC = rng.randn((num_images, l, C), generator, device, dtype).flatten(0, 1)
            mean_nC, log_var_nC = sched.p_mean_log_variance(x_nC, k_n, eps_nC, v_nC, clip_x0=True)
            # The last step's noise is drawn but unused, again to keep the random stream aligned.
            x_nC = mean_nC + torch.exp(0.5 * log_var_nC) * noise_nC * temperature if k > 0 else mean_nC
        return x_nC * self.latent_scale

    def loss(self, target_nC: torch.Tensor, cond_nD: torch.Tensor, generator: Optional[torch.Generator] = None,
             t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> DiffusionLoss:
        """Per-row epsilon MSE plus the variational bound (bits) at a random (or given) timestep `t`."""
        sched, n = self.train_schedule, target_nC.shape[0]
        x0_nC = target_nC / self.latent_scale
        if t is None:
            gen_device = generator.device if generator is not None else target_nC.device
            t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=generator, device=gen_device)
        t_n = t.to(target_nC.device)
        if noise is None:
            noise = rng.randn((n, self.latent_channels), generator, target_nC.device, x0_nC.dtype)
        xt_nC = sched.at(sched.sqrt_alphas_cumprod, t_n, x0_nC) * x0_nC + sched.at(
            sched.sqrt_one_minus_alphas_cumprod, t_n, x0_nC) * noise
        eps_nC, v_nC = self.net(xt_nC, t_n, cond_nD).chunk(2, dim=1)
        mse_n = ((noise - eps_nC) ** 2).mean(dim=1)

        # The bound trains only the variance: the mean comes from a detached eps.
        mean_nC, log_var_nC = sched.p_mean_log_variance(xt_nC, t_n, eps_nC.detach(), v_nC, clip_x0=False)
        true_mean_nC = sched.q_posterior_mean(x0_nC, xt_nC, t_n)
        true_log_var = sched.at(sched.posterior_log_variance_clipped, t_n, x0_nC)
        kl_nC = 0.5 * (-1 + log_var_nC - true_log_var + torch.exp(true_log_var - log_var_nC)
                       + (true_mean_nC - mean_nC) ** 2 * torch.exp(-log_var_nC))
        nll_nC = _discretized_gaussian_nll(x0_nC, mean_nC, log_var_nC)
        vb_n = torch.where(t_n == 0, nll_nC.mean(dim=1), kl_nC.mean(dim=1)) / math.log(2)
        return DiffusionLoss(mse_n + vb_n, mse_n, vb_n)
