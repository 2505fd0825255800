"""Build a recorded fixture set with this package's own code, laid out like `tests/fixtures/official-tiny`.

The repository's fixture set was recorded from the reference implementation at one small size. This
script writes a second set at other sizes (image side, number of scales, widths, vocabulary, text
padding side, diffusion steps), with random weights and seeded generators, so that the test suite
can be run against it and shown to take every size from the set it is given:

    python scripts/make_fixtures.py --out /tmp/fx128
    HART_FIXTURES=/tmp/fx128 python -m pytest -q tests/test_generation.py

The checkpoint is written in the official layout (`ckpt/llm`, `ckpt/tokenizer`, `ckpt/text_encoder`)
and every recorded call has the file names, tensor keys and JSON fields of the reference set. Being
computed by this package, the set proves that the tests are general, not that the package matches
the reference: that is what the recorded reference set is for.
"""
import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hart import rng  # noqa: E402
from hart.loading import load_official_tokenizer, load_official_transformer, load_text_encoder  # noqa: E402
from hart.models.diffusion import guide  # noqa: E402
from hart.models.tokenizer import HybridTokenizer  # noqa: E402
from hart.models.transformer import HARTTransformer  # noqa: E402
from hart.sampling import ForcedTokens, filter_logits, reference_top_k, sample_scales  # noqa: E402
from hart.text import SYSTEM_PROMPT, encode_prompts  # noqa: E402
from hart.training.objective import draw_kept_tokens, drop_conditions  # noqa: E402
from hart.training.tokenizer_training import PatchDiscriminator  # noqa: E402

PROMPTS = ["A watercolor painting of a lighthouse on a rocky shore at sunset, with seagulls circling above.",
           "Two cats."]
PAD, UNK = "<|endoftext|>", "<unk>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the set into (must not exist or be empty)")
    p.add_argument("--patch-nums", default="1,2,3,4,5,6,7,8", help="scale sides, comma separated")
    p.add_argument("--ch-mult", default="1,1,2,2,2", help="tokenizer channel multipliers (downsampling 2^(n-1))")
    p.add_argument("--vocab-size", type=int, default=512, help="image codebook size")
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=96, help="transformer width")
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--text-dim", type=int, default=64, help="text model hidden size (the transformer's context_dim)")
    p.add_argument("--context-tokens", type=int, default=160)
    p.add_argument("--padding-side", choices=["left", "right"], default="left")
    p.add_argument("--sampling-steps", default="10", help="diffusion sampling steps")
    p.add_argument("--seed", type=int, default=4321)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- weights
def randomize_(module: torch.nn.Module, generator: torch.Generator, codebook_std: float = 0.5) -> None:
    """Seeded random weights of a trained-looking scale: every output depends on every parameter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("embedding.weight"):  # the image codebook
                p.copy_(torch.randn(p.shape, generator=generator) * codebook_std)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_listing(sd) -> str:
    return "".join(f"{k}\t{tuple(v.shape)}\t{dtype_name(v.dtype)}\n" for k, v in sorted(sd.items()))


def write_text_encoder(folder: Path, args, g: torch.Generator) -> dict:
    """A tiny random Qwen2 and a word-level tokenizer over the words this set uses."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in PROMPTS + [SYSTEM_PROMPT] for w, _ in pre.pre_tokenize_str(text.lower())})
    vocab = {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK,
                                         padding_side=args.padding_side).save_pretrained(folder)
    # name the class as the reference set does (transformers 5 writes its own backend's name, which
    # older versions cannot read), with the padding side this set is about
    special = {str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
               for i, t in enumerate((PAD, UNK))}
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        added_tokens_decoder=special, clean_up_tokenization_spaces=False, model_max_length=4096, pad_token=PAD,
        padding_side=args.padding_side, tokenizer_class="PreTrainedTokenizerFast", unk_token=UNK), indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(dict(pad_token=PAD, unk_token=UNK), indent=2))
    qwen2 = dict(vocab_size=64 * math.ceil(len(vocab) / 64), hidden_size=args.text_dim,
                 intermediate_size=2 * args.text_dim, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=1024,
                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
                 use_sliding_window=False)
    model = transformers.Qwen2Model(transformers.Qwen2Config(**qwen2, pad_token_id=0, eos_token_id=0))
    randomize_(model, g)
    model.save_pretrained(folder, safe_serialization=True)
    return qwen2


def official_tokenizer_keys(sd):
    """This package's tokenizer keys -> the reference's: `vae.` prefix, partially shared phi as `qresi_ls`."""
    return {"vae." + re.sub(r"^quantize\.phi\.", "quantize.quant_resi.qresi_ls.", k): v.contiguous()
            for k, v in sd.items()}


def write_tokenizer(folder: Path, args, pn, g) -> dict:
    ch_mult = [int(m) for m in args.ch_mult.split(",")]
    cfg = dict(vocab_size=args.vocab_size, z_channels=args.latent_channels, ch=32, ch_mult=ch_mult, dropout=0.0,
               beta=0.25, using_znorm=False, quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4,
               default_qresi_counts=0, v_patch_nums=list(pn), test_mode=False, quantizer_type="var_hybrid", hybrid=True,
               disable_quant_resi=False, freeze_codebook_for_hybrid=True, double_decoder=False,
               disc_config=dict(input_nc=3, ndf=8, n_layers=3, use_actnorm=False))
    vae = HybridTokenizer(vocab_size=args.vocab_size, latent_channels=args.latent_channels, base_channels=32,
                          channel_multipliers=ch_mult, num_phi=4, patch_nums=pn)
    randomize_(vae, g)
    disc = PatchDiscriminator(ndf=8, num_layers=3)
    randomize_(disc, g)
    sd = official_tokenizer_keys(vae.state_dict())
    sd["vae.quantize.ema_vocab_hit_SV"] = torch.zeros(len(pn), args.vocab_size)
    sd.update({"disc." + k: v.contiguous() for k, v in disc.state_dict().items()})
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["HARTAutoEncoderWithDisc"], "model_type": "hart_autoencoder_with_disc", **cfg}, indent=2))
    return cfg


def write_transformer(folder: Path, args, pn, g) -> dict:
    cfg = dict(vae_path=None, context_token=args.context_tokens, context_dim=args.text_dim, depth=2,
               embed_dim=args.embed_dim, num_heads=args.num_heads, mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0,
               drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=False,
               patch_nums=list(pn), flash_if_available=True, fused_if_available=True, mlp_type="llama",
               attn_type="llama", disable_aln=False, use_timestep_embed=False, sep_aln_pooling_mode="max",
               use_cross_attn=False, diff_width=64, diff_depth=2, num_sampling_steps=args.sampling_steps,
               diffusion_batch_mul=4, sampler="iddpm", use_context_norm=True, context_norm_scale=1.0)
    model = HARTTransformer(
        patch_nums=pn, context_tokens=args.context_tokens, context_dim=args.text_dim, embed_dim=args.embed_dim,
        depth=2, num_heads=args.num_heads, vocab_size=args.vocab_size, latent_channels=args.latent_channels,
        use_context_norm=True, diff_width=64, diff_depth=2, num_sampling_steps=args.sampling_steps)
    randomize_(model, g)
    sd = {re.sub(r"^diffusion_head\.", "diffloss.", k): v.contiguous() for k, v in model.state_dict().items()}
    # the buffers the reference saves (this package computes them)
    levels = torch.cat([torch.zeros(args.context_tokens - 1, dtype=torch.long)]
                       + [torch.full((p * p,), k) for k, p in enumerate(pn)])
    sd["lvl_1L"] = levels[None]
    sd["attn_bias_for_masking"] = torch.where(levels[:, None] >= levels[None], 0.0, -torch.inf)[None, None]
    sd.update({f"blocks.{i}.attn.zero_k_bias": torch.zeros(args.embed_dim) for i in range(2)})
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["HARTForT2I"], "model_type": "hart_transformer_t2i", "diffusion_head_repeats": 1,
         "torch_dtype": "float32", **cfg}, indent=2, sort_keys=True))
    return cfg


# ---------------------------------------------------------------------------------------------- records
class Recorder:
    def __init__(self, root: Path):
        self.root = root

    def save(self, name: str, tensors: dict, meta: dict) -> None:
        tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
        self.json(f"{name}.json", {**meta, "tensors": {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype)}
                                                       for k, v in tensors.items()}})
        save_file(tensors, str(self.root / f"{name}.safetensors"))

    def json(self, name: str, obj) -> None:
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        (self.root / name).write_text(json.dumps(obj, indent=2))

    def pngs(self, name: str, images_B3HW: torch.Tensor) -> None:
        for i, img in enumerate(images_B3HW):
            array = (img.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
            PIL.Image.fromarray(array).save(self.root / f"{name}_{i}.png")


def input_images(side: int) -> torch.Tensor:
    """Two images in [-1, 1]: a colour gradient with a disc, and a seeded smooth random pattern."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    disc = ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.2).float()
    first = torch.stack([x, y, 0.8 * disc - 0.4])
    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    second = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)[0]
    return torch.stack([first, second.clamp(-1, 1)])


@torch.no_grad()
def record_text(rec: Recorder, te_folder: Path, context_tokens: int):
    tokenizer, model = load_text_encoder(te_folder)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=context_tokens, truncation=True,
                    return_tensors="pt")["input_ids"]
    with_sys = encode_prompts(PROMPTS, model, tokenizer, context_tokens)
    without = encode_prompts(PROMPTS, model, tokenizer, context_tokens, system_prompt=None)
    rec.save("text_encoder/encode_prompts", dict(
        context_tokens=ids, context_mask=with_sys.mask_BT, context_position_ids=with_sys.position_ids_BT,
        context_tensor=with_sys.features_BTC, context_tensor_no_system_prompt=without.features_BTC,
        system_prompt_tokens=tokenizer(SYSTEM_PROMPT, return_tensors="pt")["input_ids"],
    ), dict(description="hart.text.encode_prompts(prompts, text_model, tokenizer, max_length, system_prompt) on "
                        "the tiny random Qwen2Model + word-level tokenizer", prompts=PROMPTS,
            call=dict(text_tokenizer_max_length=context_tokens, system_prompt="hart.text.SYSTEM_PROMPT",
                      use_llm_system_prompt=True),
            pad_token_id=tokenizer.pad_token_id, padding_side=tokenizer.padding_side,
            notes=["context_mask = context_tokens != pad_token_id; context_position_ids = cumsum(mask, 1) - 1",
                   "context_tensor_no_system_prompt: system_prompt=None"]))
    return with_sys


@torch.no_grad()
def record_tokenizer(rec: Recorder, vae, pn, side: int):
    x = input_images(side)
    q, S = vae.quantize, len(pn)
    f = vae.encode_latent(x)
    idx, residual = q.encode(f, pn)
    last_embed = q.embedding(idx[-1])
    t = dict(input_images=x, encoder_features=vae.encoder(x), quant_conv_features=f,
             frest_last=residual + last_embed, last_scale_embedding=last_embed, residual_continuous=residual,
             x_BLCv_wo_first_l=q.teacher_forcing_input(idx, pn))
    t.update({f"idx_s{si}": i for si, i in enumerate(idx)})
    t.update({f"var_idx_s{si}": i for si, i in enumerate(q.encode_var(f, pn))})
    f_hat = torch.zeros_like(f)
    for si in range(S - 1):
        f_hat, _ = q.next_scale_input(si, pn, f_hat, q.embed(idx[si]))
        t[f"f_hat_after_s{si}"] = f_hat
    t[f"f_hat_after_s{S - 1}"] = t["f_hat_discrete"] = q.idx_to_fhat(idx, pn)
    t["f_hat_hybrid"] = q.idx_to_fhat(idx, pn, residual)
    t["decoded_discrete"], t["decoded_hybrid"] = vae.tokens_to_img(idx), vae.tokens_to_img(idx, residual)
    t["var_reconstructed_last"] = vae(x, skip_continuous=True)[0].clamp(-1, 1)
    t["forward_out"], t["forward_vq_loss"], _ = vae(x, skip_continuous=False)
    rec.save("tokenizer/tokenizer", t, dict(
        description="HybridTokenizer on a fixed image batch, weights from ckpt/tokenizer", patch_nums=list(pn),
        max_abs_f_hat_hybrid_minus_f=(t["f_hat_hybrid"] - f).abs().max().item(),
        notes=["input_images in [-1,1]: image 0 = gradient with a disc, image 1 = seeded smooth random pattern"]))
    for name in ("input", "decoded_discrete", "decoded_hybrid"):
        rec.pngs(f"tokenizer/{name}", (t["input_images" if name == "input" else name] + 1) / 2)
    return t


@torch.no_grad()
def record_transformer_forward(rec: Recorder, transformer, vae, cond, tok, pn):
    S, B = len(pn), cond.batch_size
    inputs = dict(context=cond.features_BTC, context_mask=cond.mask_BT, context_position_ids=cond.position_ids_BT,
                  x_BLCv_wo_first_l=tok["x_BLCv_wo_first_l"], last_layer_gt=tok["frest_last"],
                  last_layer_gt_discrete=tok[f"idx_s{S - 1}"])
    rec.save("transformer_forward/inputs", inputs, dict(description="inputs of the training forward"))
    head, codebook = transformer.diffusion_head, vae.quantize.embedding.weight
    for name, drop_rows in (("nodrop", []), ("default_drop", [0])):
        g = torch.Generator().manual_seed(1245)
        keep_BK = draw_kept_tokens(B, pn[-1] ** 2, g, "cpu")
        drop_B = torch.zeros(B, dtype=torch.bool)
        drop_B[drop_rows] = True
        kept = drop_conditions(cond, drop_B)
        logits, hidden_BKC = transformer(*kept, inputs["x_BLCv_wo_first_l"], keep_BK)
        K = keep_BK.shape[1]
        sampled = rng.multinomial(filter_logits(logits[:, -K:], 600, 0.96).softmax(-1), g)
        code = codebook[sampled]
        z = transformer.diffusion_condition(hidden_BKC, code)
        target = inputs["last_layer_gt"].gather(1, keep_BK[..., None].expand(-1, -1, code.shape[-1])) - code
        mul = transformer.config.diffusion_batch_mul
        target, c = target.flatten(0, 1).repeat(mul, 1), z.flatten(0, 1).repeat(mul, 1)
        t = torch.randint(0, 1000, (target.shape[0],), generator=g)
        noise = rng.randn(target.shape, g, "cpu")
        terms = head.loss(target, c, t=t, noise=noise)
        rec.save(f"transformer_forward/{name}", dict(
            cond_drop_rows=torch.tensor(drop_rows, dtype=torch.long), diffusion_t=t, idx_BL_sampled=sampled,
            mask_wo_prev_stages_batch=torch.arange(B).repeat_interleave(K), mask_wo_prev_stages_token=keep_BK.flatten(),
            diff_loss=terms.loss.mean(), diffusion_c=c, diffusion_loss_per_sample=terms.loss, diffusion_mse=terms.mse,
            diffusion_noise=noise, diffusion_vb=terms.vb, diffusion_x_start=target / head.latent_scale,
            last_layer_cond=z, logits=logits,
        ), dict(description="HARTTransformer.forward + the hart_loss terms, model.eval(), torch.no_grad()",
                call=dict(seeding="torch.Generator().manual_seed(1245): kept tokens, sampled indices "
                                  "(top_k=600, top_p=0.96), diffusion t, diffusion noise", cond_drop_rows=drop_rows)))


@torch.no_grad()
def record_diffusion(rec: Recorder, head, embed_dim: int, g):
    C = head.latent_channels
    x, t = torch.randn(8, C, generator=g), torch.randint(0, 1000, (8,), generator=g)
    c = torch.randn(8, embed_dim, generator=g)
    out = head.net(x[:4].repeat(2, 1), t, c)
    eps, _ = guide(out, 4.5)
    cfg_out = torch.cat([torch.cat([eps, eps]), out[:, C:]], dim=1)
    rec.save("diffloss/net", dict(x=x, t=t, c=c, net_out=head.net(x, t, c), time_embed=head.net.time_embed(t),
                                  net_out_cfg=cfg_out), dict(
        description="DiffusionHead.net = MLP(in=Cvae, out=2*Cvae)",
        calls=dict(net_out="head.net(x, t, c)", time_embed="head.net.time_embed(t)",
                   net_out_cfg="guide(head.net(x[:4].repeat(2, 1), t, c), cfg_scale=4.5): guided eps on both "
                               "halves, each half's own variance values")))
    z = torch.randn(12, embed_dim, generator=g)
    seed = 1256
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    rec.save("diffloss/sample", dict(
        z=z, sample_cfg=head.sample(z[:6], z[6:], guidance_scale=4.5, generator=gen(), num_images=2),
        sample_cfg_initial_noise=rng.randn((2, 3, C), gen(), "cpu").flatten(0, 1),
        sample_nocfg=head.sample(z, generator=gen()), sample_nocfg_initial_noise=rng.randn((1, 12, C), gen(), "cpu")[0],
    ), dict(description="DiffusionHead.sample; rows of sample_cfg are the conditional half only",
            calls=dict(sample_cfg=f"head.sample(z[:6], z[6:], cfg=4.5, num_images=2, generator=torch.Generator()"
                                  f".manual_seed({seed}))",
                       sample_nocfg=f"head.sample(z, cfg=1.0 (no unconditional rows), generator=torch.Generator()"
                                    f".manual_seed({seed}))")))
    target, zz = torch.randn(8, C, generator=g) * 0.3, torch.randn(8, embed_dim, generator=g)
    loss = head.loss(target, zz, generator=torch.Generator().manual_seed(1257)).loss.mean()
    rec.save("diffloss/train_loss", dict(target=target, z=zz, loss=loss), dict(
        description="head.loss(target, z, generator=torch.Generator().manual_seed(1257)).loss.mean()"))
    s = head.sample_schedule
    rec.json("diffloss/gen_diffusion_schedule.json", dict(
        timestep_map=[int(v) for v in s.timesteps], num_timesteps=len(s.timesteps), betas=s.betas.tolist(),
        alphas_cumprod=s.alphas_cumprod.tolist(),
        posterior_log_variance_clipped=s.posterior_log_variance_clipped.tolist(),
        num_sampling_steps=str(len(s.timesteps)), noise_schedule="cosine", vae_scale=head.latent_scale))


GENERATION_CASES = {  # name: (B, cfg, top_k per stage or None for the release's, more_smooth)
    "default": (2, 4.5, None, False), "more_smooth": (2, 4.5, None, True), "topk1_arg": (2, 4.5, None, False),
    "greedy": (2, 4.5, 1, False), "greedy_more_smooth": (2, 4.5, 1, True), "default_b1": (1, 4.5, None, False),
    "cfg1": (2, 1.0, None, False),
}


@torch.no_grad()
def record_generation(rec: Recorder, transformer, vae, cond):
    pn = transformer.patch_nums
    S = len(pn)
    rec.save("generation/inputs", dict(label_B=cond.features_BTC, context_mask=cond.mask_BT,
                                       context_position_ids=cond.position_ids_BT),
             dict(description="text conditioning of the generation cases (from text_encoder/encode_prompts)"))
    summary, head = {}, transformer.diffusion_head
    for name, (B, cfg, top_k, smooth) in GENERATION_CASES.items():
        top_ks = [reference_top_k(si) if top_k is None else top_k for si in range(S)]
        t, diff = {}, []
        original = head.sample
        head.sample = lambda zc, zu, **kw: diff.append((torch.cat([zc, zu]), original(zc, zu, **kw))) or diff[-1][1]
        start = time.process_time()
        try:
            f_hat = sample_scales(
                transformer, vae.quantize, type(cond)(*(x[:B] for x in cond)), guidance_scale=cfg, top_k=top_ks,
                more_smooth=smooth, generator=torch.Generator().manual_seed(1),
                callback=lambda s: t.__setitem__(f"idx_stage{s.si}", s.idx_Bl),
                forced=ForcedTokens(
                    logits_processor=lambda si, logits: t.__setitem__(f"logits_stage{si}", logits) or logits))
        finally:
            head.sample = original
        images = (vae.decode_latent(f_hat) + 1) / 2
        seconds = time.process_time() - start
        t.update(diff_z_0=diff[0][0], diff_out_0=diff[0][1], f_hat=f_hat, images=images)
        ratio = (S - 2) / (S - 1)  # the last scale's guidance uses the ratio of the scale before it
        rec.save(f"generation/{name}", t, dict(
            description="hart.sampling.sample_scales(...) then (vae.decode_latent(f_hat) + 1) / 2",
            call=dict(B=B, g_seed=1, cfg=cfg, top_k=0, top_p=0.0, more_smooth=smooth, label_B=f"inputs.label_B[:{B}]",
                      context_position_ids=f"inputs.context_position_ids[:{B}]",
                      context_mask=f"inputs.context_mask[:{B}]", final_stage=0, num_maskgit_iters=1),
            seeding="generator=torch.Generator().manual_seed(g_seed): tokens, gumbel noise and diffusion noise",
            sampler_patch=None,
            stage_sampler_calls=[dict(stage=si, top_k=k, caller_top_k=1 if name == "topk1_arg" else k, top_p=0.0)
                                 for si, k in enumerate(top_ks)],
            diffloss_sample_calls=[dict(cfg=cfg * ratio, temperature=1.0)], cpu_seconds=seconds,
            rng_order=["one generator: per scale the token draw (then the gumbel noise with more_smooth); at the last "
                       "scale the diffusion's initial noise and one draw per sampling step"],
            notes=["diff_out_0 holds the conditional rows only (B * P^2)"]))
        rec.pngs(f"generation/{name}", images)
        summary[name] = dict(seconds=seconds, shape=list(images.shape))
    rec.json("generation/summary.json", summary)


def manifest(root: Path) -> dict:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "ckpt" not in p.parts):
        entry = {"bytes": path.stat().st_size}
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                entry["tensors"] = {k: {"shape": list(f.get_slice(k).get_shape()),
                                        "dtype": dtype_name(f.get_tensor(k).dtype)} for k in f.keys()}
        out[str(path.relative_to(root))] = entry
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    root = Path(args.out)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"--out {root} exists and is not empty")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pn = tuple(int(p) for p in args.patch_nums.split(","))
    g = torch.Generator().manual_seed(args.seed)
    ckpt = root / "ckpt"
    qwen2 = write_text_encoder(ckpt / "text_encoder", args, g)
    tok_cfg = write_tokenizer(ckpt / "tokenizer", args, pn, g)
    tr_cfg = write_transformer(ckpt / "llm", args, pn, g)
    vae, transformer = load_official_tokenizer(ckpt / "tokenizer"), load_official_transformer(ckpt / "llm")
    side = pn[-1] * vae.downsample_factor
    rec = Recorder(root)
    cond = record_text(rec, ckpt / "text_encoder", args.context_tokens)
    tok = record_tokenizer(rec, vae, pn, side)
    record_transformer_forward(rec, transformer, vae, cond, tok, pn)
    record_diffusion(rec, transformer.diffusion_head, args.embed_dim, g)
    record_generation(rec, transformer, vae, cond)
    listings = {}
    for name, folder in (("tokenizer", "tokenizer"), ("transformer", "llm"), ("text_encoder", "text_encoder")):
        sd = load_file(str(ckpt / folder / "model.safetensors"))
        (root / f"keys_{name}.txt").write_text(tensor_listing(sd))
        listings[name] = {"num_tensors": len(sd), "num_elements": sum(v.numel() for v in sd.values())}
    rec.json("config.json", dict(
        name="hart_generated", derived_from="scripts/make_fixtures.py", seed=args.seed, image_size=side,
        batch_size=len(PROMPTS), prompts=PROMPTS, tokenizer=tok_cfg, transformer=tr_cfg,
        text_encoder=dict(qwen2=qwen2, padding_side=args.padding_side, max_token_length=args.context_tokens,
                          use_llm_system_prompt=True),
        generation=dict(g_seed=1, cfg=4.5), weights=dict(codebook_std=0.5)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    rec.json("environment.json", dict(
        python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
        numpy=np.__version__, threads=torch.get_num_threads(), hart_root=f"hart (this package) @ {commit or 'unknown'}",
        command=" ".join(["scripts/make_fixtures.py", *(argv if argv is not None else sys.argv[1:])]),
        key_listings=listings, total_seconds=time.time() - start))
    rec.json("manifest.json", manifest(root))
    print(f"wrote {root} ({side} px, scales {pn}) in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
