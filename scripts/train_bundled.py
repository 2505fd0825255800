"""Train the bundled shapes-world HART model end to end, on CPU, with the package's own training code.

    python scripts/train_bundled.py --work /tmp/bundled            # the full recipe
    python scripts/train_bundled.py --work /tmp/bundled-smoke --quick   # minutes: a smoke test of every phase
    python scripts/train_bundled.py --work /tmp/bundled --install   # ...and copy the result to hart/bundled/shapes-128
    python scripts/train_bundled.py --work /tmp/bundled-v2 --grammar_variants 2 --text_facts   # wordings of the grammar
    python scripts/train_bundled.py --work /tmp/bundled-m --grammar_variants 2 --text_facts --transformer_size medium
    python scripts/train_bundled.py --work /tmp/speed --only throughput            # training speed of this machine
    python scripts/train_bundled.py --work /tmp/bundled-d --no_refine_decoder   # the recipe without the refine phase

Phases (each prints its CPU and wall time; a phase whose output already exists in WORK is reused,
so an interrupted run continues where it stopped; `--redo PHASE` forces one again):

  data         shapes-world renders + captions (hart.data.shapes_dataset.write_dataset): a training set for
               the transformer, a set for the tokenizer, 500 held-out renders for the tokenizer's PSNR.
               `--grammar_variants K` captions the training set with the caption grammar (hart.data.grammar,
               training wordings), K captions per image; the cache stores each as its own example
  text         sentencepiece unigram tokenizer + Qwen2 causal LM trained on the training captions (frozen after);
               `--text_facts`: on template and grammar captions of its own scenes, read after the system prompt,
               with the fact loss besides (hart.data.facts)
  tokenizer    the hybrid tokenizer from scratch (hart.training.cli tokenizer_main)
  decoder      the tokenizer's decoder alone, longer (encoder and codebook frozen, so the cache stays valid)
  init         the starting pipeline: text model + tokenizer + a random HARTTransformer (VAR-style init)
  cache        pre-encoded training set (finetune_main --cache_only)
  transformer  the transformer (finetune_main on the cache; a checkpoint every 1,000 steps, so a stopped
               phase resumes)
  refine       the decoder of the decoder phase, trained further to decode latents the trained transformer
               drew after the first scales of training images it did not see (hart.training.decoder_refine);
               skipped with `--no_refine_decoder`
  assemble     WORK/pipeline: the trained pipeline with the decoder of the refine phase (of the decoder phase
               with `--no_refine_decoder`), and its guidance
  eval         ShapesEval (2 seeds per prompt) with and without the residual diffusion and on the held-out
               wordings (hart/eval/shapes_prompts_heldout.jsonl), tokenizer PSNR on
               the held-out renders (hybrid vs discrete-only), a fact probe of the text features on three
               kinds of wording (hart.eval.text_probe), a sample grid; `WORK/report.json`
  diagnose     ShapesEval when the first K scales come from each prompt's ground-truth render (K = 0 to S-1),
               and of the tokenizer's reconstructions: which scales the transformer gets wrong;
               `WORK/diagnose.json`
  throughput   only when named in --only: forward + backward speed of the recipe's transformer and text model
               (random weights and inputs of the recipe's shapes), fp32 and bf16 autocast; `WORK/throughput.json`

The exported pipeline is `WORK/pipeline` (float32, about 10 MB).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
PATCH_NUMS = [1, 2, 3, 4, 6, 8, 11, 16]

# Transformer sizes (`--transformer_size`): dimensions, and the learning rate and steps of the transformer phase.
# `small` is the shipped model's (1.4 M parameters with its diffusion head, 33 images/s on two AMD EPYC cores);
# `medium` has 4.7 M and trains at 15 images/s, so it takes half the steps; in that time it learns less than
# `small` (docs/bundled_model.md, "What was tried"): it is for machines that can train it longer.
SIZES = {
    "small": dict(transformer=dict(embed_dim=128, depth=4, num_heads=4, diff_width=128), lr=2e-3, max_steps=10000),
    "medium": dict(transformer=dict(embed_dim=192, depth=6, num_heads=6, diff_width=192), lr=1.5e-3, max_steps=5000),
}
FULL = dict(
    train_images=24000, tok_images=8000, heldout_images=500, ft_images=12000,
    text=dict(vocab_size=256, hidden=128, layers=2, heads=4, steps=600, batch_size=64, lr=3e-3),
    # --text_facts: the text model reads captions of its own scenes instead (per scene one caption of the fixed
    # templates, how the committed prompts are worded, and `grammar` of the caption grammar), after the system
    # prompt, and learns each caption's facts besides (hart.data.facts)
    text_facts=False,
    text_corpus=dict(scenes=24000, grammar=4, seed=1),
    text_facts_train=dict(vocab_size=384, steps=1200),
    # 4 x 4 pixel patches folded into channels, then two levels (32 x 32 and 16 x 16): a 16 x 16 latent
    # (downsample 8). The release's layout scaled down (five levels, downsample 16, full-resolution
    # convolutions) learnt too slowly on CPU: 19-20 dB held-out PSNR after 1,200 steps.
    # 8 GroupNorm groups: at 32 channels the release's 32 groups normalise each channel alone, which
    # removes the flat colours these pictures are made of
    tokenizer=dict(vocab_size=128, latent_channels=16, base_channels=32, channel_multipliers=[1, 2],
                   num_res_blocks=1, patch_nums=PATCH_NUMS, norm_groups=8, patch_size=4),
    tok_train=dict(max_steps=4000, batch_size=8, lr=2e-3, warmup_steps=50, min_lr_ratio=0.05,
                   restart_dead_codes_every=25),
    dec_train=dict(max_steps=1500, batch_size=8, lr=1e-3, warmup_steps=20, min_lr_ratio=0.05, skip_continuous_prob=0.1),
    transformer=dict(patch_nums=PATCH_NUMS, context_tokens=32, mlp_ratio=3.0, vocab_size=128, latent_channels=16,
                     diff_depth=2, num_sampling_steps="8", cond_drop_rate=0.1, **SIZES["small"]["transformer"]),
    ft_train=dict(max_steps=SIZES["small"]["max_steps"], batch_size=16, lr=SIZES["small"]["lr"], warmup_steps=50,
                  min_lr_ratio=0.05, ema_decay=0.998),
    # decoder refinement (off with --no_refine_decoder): latents drawn after the first 7 scales of 6,000 training images the
    # transformer did not see and after the first 6 of 2,000 more, then 2,000 decoder steps (a quarter on the
    # images' own latents)
    refine_decoder=True,
    refine=dict(keep_scales={"7": 6000, "6": 2000}, steps=2000, lr=2e-4, batch_size=16, own_share=0.25),
    # the model's own guidance (its pipeline config: what the CLI, app and pipeline use when given none), so
    # `hart generate` without options gives what was measured; 3 scores above the release's 4.5 on this model
    eval_seeds=2, guidance_scale=3.0,
    grammar_variants=0,  # 0: the fixed templates of hart.data.captions, one caption per image
    throughput=dict(batch_size=32, steps=20, warmup_steps=3, text_tokens=32),
    probe=dict(train_scenes=4000, test_scenes=2000, steps=1500),
)
QUICK = dict(
    FULL, train_images=64, tok_images=32, heldout_images=16, ft_images=32,
    text_corpus=dict(FULL["text_corpus"], scenes=64), text_facts_train=dict(FULL["text_facts_train"], steps=5),
    text=dict(FULL["text"], steps=5, batch_size=8),
    tok_train=dict(FULL["tok_train"], max_steps=2, batch_size=4),
    dec_train=dict(FULL["dec_train"], max_steps=2, batch_size=4),
    ft_train=dict(FULL["ft_train"], max_steps=2, batch_size=4),
    refine=dict(FULL["refine"], keep_scales={"7": 8, "6": 8}, steps=2, batch_size=4),
    eval_seeds=1, eval_prompts=16,
    throughput=dict(batch_size=4, steps=2, warmup_steps=1, text_tokens=32),
    probe=dict(train_scenes=64, test_scenes=16, steps=5),
)
# The tokenizer trains on scenes with several objects (more edges per image) and on the one category with
# coloured backgrounds (every other scene is on grey); the transformer on all categories.
TOK_CATEGORIES = ("counting", "two_objects", "colour_attribution", "relative_position", "background")
DATA_SEEDS = dict(train=1, tok=3, heldout=7)


class Phases:
    """Runs the phases, times them (CPU time of this process and its threads, and wall time)."""

    def __init__(self, work: Path, redo, only=None):
        self.work, self.redo, self.only, self.times = work, set(redo), only, {}
        self.path = work / "times.json"
        if self.path.is_file():
            self.times = json.loads(self.path.read_text())

    def run(self, name: str, output: Path, fn):
        if self.only is not None and name not in self.only:
            return
        if output.exists() and name not in self.redo:
            print(f"[{name}] reusing {output}", flush=True)
            return
        print(f"[{name}] ...", flush=True)
        c0, w0 = time.process_time(), time.time()
        fn()
        if self.path.is_file():  # another process may have finished a phase meanwhile
            self.times = {**json.loads(self.path.read_text()), **self.times}
        cpu, wall = time.process_time() - c0, time.time() - w0
        self.times[name] = {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}
        self.path.write_text(json.dumps(self.times, indent=2))
        print(f"[{name}] done: {cpu:.0f} s CPU, {wall:.0f} s wall", flush=True)


# ---- phases ----------------------------------------------------------------------------------
def make_data(work: Path, cfg: dict) -> None:
    from hart.data.shapes import CATEGORIES
    from hart.data.shapes_dataset import write_dataset

    for name, n, categories in (("heldout", cfg["heldout_images"], CATEGORIES), ("train", cfg["train_images"], CATEGORIES),
                                ("tok", cfg["tok_images"], TOK_CATEGORIES)):
        if not (work / "data" / name / "metadata.jsonl").is_file():  # a folder written before is reused
            write_dataset(work / "data" / name, n, DATA_SEEDS[name], categories,
                          grammar_variants=cfg["grammar_variants"] if name == "train" else 0)
    lines = (work / "data" / "train" / "metadata.jsonl").read_text().splitlines()
    written = "_" in json.loads(lines[0])["file_name"]  # grammar captions are named 00000_0.png, 00000_1.png, ...
    if written != bool(cfg["grammar_variants"]):
        raise SystemExit(f"{work / 'data' / 'train'} was written with another --grammar_variants: use another --work")
    # the transformer's training subset: the first ft_images images of the training set, with all their
    # captions (symlinks + metadata)
    ft = work / "data" / "ft"
    ft.mkdir(parents=True, exist_ok=True)
    lines = [line for line in lines if int(json.loads(line)["file_name"].split(".")[0].split("_")[0]) < cfg["ft_images"]]
    for line in lines:
        name = json.loads(line)["file_name"]
        link = ft / name
        if not link.exists():
            link.symlink_to((work / "data" / "train" / name).resolve())
    (ft / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def text_corpus(scenes: int, grammar: int, seed: int):
    """(captions, specs): for each of `scenes` fresh scenes, a caption of the fixed templates and `grammar`
    captions of the caption grammar's training wordings."""
    from hart.data import captions as templates
    from hart.data import grammar as wordings
    from hart.data.shapes import CATEGORIES, sample_scene

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(scenes):
        scene = sample_scene(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
        pairs += [templates.describe(scene, rng)] + [wordings.describe(scene, rng) for _ in range(grammar)]
    return [c for c, _ in pairs], [s for _, s in pairs]


def train_text(work: Path, cfg: dict) -> None:
    from hart.data.text_model import train_text_model
    from hart.text import SYSTEM_PROMPT

    if not cfg["text_facts"]:
        captions = [json.loads(l)["text"] for l in (work / "data" / "train" / "metadata.jsonl").read_text().splitlines()]
        train_text_model(captions, work / "text_model", **cfg["text"])
        return
    captions, specs = text_corpus(**cfg["text_corpus"])
    train_text_model(captions, work / "text_model", specs=specs, system_prompt=SYSTEM_PROMPT,
                     max_length=cfg["transformer"]["context_tokens"], **{**cfg["text"], **cfg["text_facts_train"]})


def init_tokenizer(work: Path, cfg: dict) -> Path:
    """A fresh HybridTokenizer whose codebook is initialised from its own encoder's latents on training
    images (data-dependent init). With the default N(0, 1) codebook, a short CPU run collapses onto a
    handful of codes (measured: 7 of 512 used)."""
    from PIL import Image

    from hart import HybridTokenizer

    torch.manual_seed(0)
    vae = HybridTokenizer(**cfg["tokenizer"])
    files = sorted((work / "data" / "tok").glob("*.png"))[:32]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                     .permute(2, 0, 1) for f in files])
    with torch.no_grad():
        z = vae.encode_latent(x).permute(0, 2, 3, 1).reshape(-1, vae.config.latent_channels)
        V = vae.config.vocab_size
        pick = torch.randperm(z.shape[0])[:V] if z.shape[0] >= V else torch.randint(z.shape[0], (V,))
        vae.quantize.embedding.weight.copy_(z[pick] + 0.01 * z.std() * torch.randn(V, z.shape[1]))
    out = work / "runs" / "tok_init"
    vae.save_pretrained(out)
    return out


def _has_checkpoint(run: Path) -> bool:
    return any((run / "checkpoints").glob("checkpoint-*")) if (run / "checkpoints").is_dir() else False


def train_tok(work: Path, cfg: dict) -> None:
    (work / "tok.json").write_text(json.dumps(cfg["tokenizer"]))
    start = work / "runs" / "tok_init"
    if not (start / "config.json").is_file():
        start = init_tokenizer(work, cfg)
    t = cfg["tok_train"]
    argv = ["--pretrained", str(start), "--data_dir", str(work / "data" / "tok"),
            "--output_dir", str(work / "runs" / "tok"), "--mixed_precision", "no", "--seed", "0",
            "--checkpoint_every", "200", "--max_steps", str(t["max_steps"]), "--batch_size", str(t["batch_size"]),
            "--lr", str(t["lr"]), "--warmup_steps", str(t["warmup_steps"]), "--min_lr_ratio", str(t["min_lr_ratio"]),
            "--restart_dead_codes_every", str(t["restart_dead_codes_every"])]
    _run_tokenizer_training(argv, work / "runs" / "tok")


def _run_tokenizer_training(argv, run: Path) -> None:
    from hart.training.cli import tokenizer_main

    if _has_checkpoint(run):
        argv += ["--resume", "latest"]  # an interrupted run continues exactly
    if tokenizer_main(argv) != 0:
        raise SystemExit("tokenizer training failed")
    if not (run / "tokenizer").is_dir():
        raise SystemExit("tokenizer training stopped early: run the same command again to resume it")


def train_decoder(work: Path, cfg: dict) -> None:
    """The hybrid stage: the decoder alone, longer, from the trained tokenizer. Encoder, codebook and
    quant_conv stay frozen, so the transformer's cached codes and residuals stay valid and this phase
    can run at the same time as `cache` and `transformer` (`--only decoder` in a second process)."""
    t = cfg["dec_train"]
    argv = ["--pretrained", str(work / "runs" / "tok" / "tokenizer"), "--data_dir", str(work / "data" / "tok"),
            "--output_dir", str(work / "runs" / "dec"), "--trainable", "decoder", "--mixed_precision", "no",
            "--seed", "1", "--checkpoint_every", "250", "--max_steps", str(t["max_steps"]),
            "--batch_size", str(t["batch_size"]), "--lr", str(t["lr"]), "--warmup_steps", str(t["warmup_steps"]),
            "--min_lr_ratio", str(t["min_lr_ratio"]), "--skip_continuous_prob", str(t["skip_continuous_prob"])]
    _run_tokenizer_training(argv, work / "runs" / "dec")


def var_init(transformer, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
    """VAR-style initialisation of a fresh HARTTransformer (the module defaults train poorly from scratch):
    truncated-normal linears and embeddings with std sqrt(1 / 3C), zero biases, branch outputs scaled by
    1/sqrt(2 depth), AdaLN modulations small (gates ~0, so every block starts as the identity), a small
    head. The diffusion head keeps its own init (`DiffusionHead.init_weights`)."""
    import torch.nn as nn

    C, depth = transformer.config.embed_dim, transformer.config.depth
    std = math.sqrt(1 / C / 3)
    for name, m in transformer.named_modules():
        if name.startswith("diffusion_head"):
            continue
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    with torch.no_grad():
        for block in transformer.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.down_proj.weight.div_(math.sqrt(2 * depth))
            w = block.ada_lin[-1].weight
            w[2 * C:].mul_(init_adaln)
            w[: 2 * C].mul_(init_adaln_gamma)
        transformer.head.weight.mul_(init_head)
        transformer.head_nm.ada_lin[-1].weight.mul_(init_adaln)


def build_init(work: Path, cfg: dict) -> None:
    from hart import HARTPipeline, HARTTransformer, HybridTokenizer
    from hart.data.text_model import load_text_model

    tokenizer, text_encoder = load_text_model(work / "text_model")
    vae = HybridTokenizer.from_pretrained(work / "runs" / "tok" / "tokenizer")
    torch.manual_seed(0)
    tr = HARTTransformer(context_dim=text_encoder.config.hidden_size, **cfg["transformer"])
    var_init(tr)
    HARTPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=tr, vae=vae).save_pretrained(
        work / "init_pipeline")


def _ft_argv(work: Path, cfg: dict):
    t = cfg["ft_train"]
    return ["--pretrained", str(work / "init_pipeline"), "--data_dir", str(work / "data" / "ft"),
            "--cache_dir", str(work / "cache"), "--output_dir", str(work / "runs" / "ft"), "--mixed_precision", "no",
            "--batch_size", str(t["batch_size"]), "--max_steps", str(t["max_steps"]), "--lr", str(t["lr"]),
            "--warmup_steps", str(t["warmup_steps"]), "--min_lr_ratio", str(t["min_lr_ratio"]),
            "--ema_decay", str(t["ema_decay"]), "--checkpoint_every", "1000", "--seed", "0",
            # every weight of the random transformer trains (not LoRA adapters on it), on the recipe's data alone
            "--lora_rank", "0", "--prior_ratio", "0", "--adapt_tokenizer", "never",
            "--validation_prompt", "a red circle on a blue background", "--validation_guidance", str(cfg["guidance_scale"])]


def build_cache(work: Path, cfg: dict) -> None:
    from hart.training.cli import finetune_main

    if finetune_main(_ft_argv(work, cfg) + ["--cache_only"]) != 0:
        raise SystemExit("caching failed")


def train_transformer(work: Path, cfg: dict) -> None:
    from hart.training.cli import finetune_main

    argv = _ft_argv(work, cfg)
    if _has_checkpoint(work / "runs" / "ft"):
        argv += ["--resume", "latest"]
    if finetune_main(argv) != 0:
        raise SystemExit("transformer training failed")
    if not (work / "runs" / "ft" / "pipeline").is_dir():
        raise SystemExit("transformer training stopped early: run the same command again to resume it")


def _tokenizer_of(work: Path, phase: str, pipe):
    """The tokenizer that `phase` (runs/dec or runs/refine) trained, checked to encode exactly as `pipe`'s does."""
    from hart import HybridTokenizer

    tuned = HybridTokenizer.from_pretrained(work / "runs" / phase / "tokenizer")
    for name in ("encoder", "quant_conv", "quantize"):  # frozen in the decoder phases: must be the same
        ours, theirs = getattr(pipe.vae, name).state_dict(), getattr(tuned, name).state_dict()
        if not all(torch.equal(ours[k], theirs[k]) for k in ours):
            raise SystemExit(f"runs/{phase} changed the tokenizer's {name}: it was not trained from runs/tok")
    return tuned


def refine(work: Path, cfg: dict) -> None:
    """The decoder of the hybrid stage, trained further on latents the trained transformer drew for training
    images after their first scales (hart.training.decoder_refine), on training images the transformer
    did not see."""
    from PIL import Image

    from hart import HARTPipeline
    from hart.training.decoder_refine import drawn_latents, refine_decoder

    r = cfg["refine"]
    pipe = HARTPipeline.from_pretrained(work / "runs" / "ft" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.register_modules(vae=_tokenizer_of(work, "dec", pipe))
    data = work / "data" / "train"
    records = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    start = cfg["ft_images"]  # the transformer trained on the images before this one
    if len(records) < start + sum(r["keep_scales"].values()):
        raise SystemExit(f"refine needs {sum(r['keep_scales'].values())} training images after the transformer's "
                         f"{start}; data/train has {len(records)}")
    drawn, own, images = [], [], []
    for keep, n in r["keep_scales"].items():
        chunk = records[start:start + n]
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(data / e["file_name"]).convert("RGB")))
                              .permute(2, 0, 1) for e in chunk])
        d, o = drawn_latents(pipe, pixels, [e["text"] for e in chunk], keep_scales=int(keep),
                             guidance_scale=cfg["guidance_scale"], seeds=range(start, start + n))
        drawn.append(d)
        own.append(o)
        images.append(pixels)
        start += n
    log = refine_decoder(pipe.vae, torch.cat(drawn), torch.cat(own), torch.cat(images), steps=r["steps"],
                         lr=r["lr"], batch_size=r["batch_size"], own_share=r["own_share"])
    print("[refine] L1 loss by step:", ", ".join(f"{s} {v:.4f}" for s, v in log), flush=True)
    pipe.vae.save_pretrained(work / "runs" / "refine" / "tokenizer")


def assemble(work: Path, cfg: dict) -> None:
    """The shipped folder: the trained pipeline with the decoder of the refine phase, or of the hybrid stage
    (float32, a few MB), the guidance the reported numbers were measured at as its own (pipeline config),
    and in `bundled.json` its world (the shapes world) and whether its decoder was refined (a fine-tune then
    refines it again, `hart.training.decoder_refine`)."""
    from hart import HARTPipeline

    pipe = HARTPipeline.from_pretrained(work / "runs" / "ft" / "pipeline")
    pipe.register_modules(vae=_tokenizer_of(work, "refine" if cfg["refine_decoder"] else "dec", pipe))
    pipe.register_to_config(guidance_scale=cfg["guidance_scale"])
    dst = work / "pipeline"
    if dst.exists():
        shutil.rmtree(dst)
    pipe.save_pretrained(dst)
    notes = {"resolution": 128, "world": "shapes", "decoder_refined": cfg["refine_decoder"]}
    (dst / "bundled.json").write_text(json.dumps(notes, indent=2) + "\n")
    # The app's example prompts: kept from the shipped folder (prompts of the committed ShapesEval set).
    shutil.copy(REPO / "hart" / "bundled" / "shapes-128" / "examples.json", dst / "examples.json")
    # Shipped files name no local path, and the text tokenizer class by the name that transformers 4
    # and 5 both know (5 saves its new name, `TokenizersBackend`, which 4 cannot load).
    for name in ("model_index.json", "vae/config.json", "transformer/config.json", "tokenizer/tokenizer_config.json"):
        config = json.loads((dst / name).read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
        config.pop("_name_or_path", None)
        (dst / name).write_text(json.dumps(config, indent=2) + "\n")


# ---- evaluation ------------------------------------------------------------------------------
def load_pipeline(folder):
    from hart import HARTPipeline

    pipe = HARTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts, seeds, guidance_scale, discrete_only=False, batch_size=64, kept_idx=None):
    """Images for every (prompt, seed), prompt-major; discrete-only zeroes the residual diffusion.

    `kept_idx`: per-scale token maps `(len(prompts), p*p)` imposed instead of sampled (one per
    prompt, the first scales only), as variations keep an input's layout.
    """
    from hart.sampling import ForcedTokens, SamplingOptions

    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    images = []
    P = pipe.transformer.patch_nums[-1]
    Cv = pipe.transformer.config.latent_channels
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i: i + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, _, s in chunk]
        rows = torch.tensor([k for k, _, _ in chunk])
        forced = ForcedTokens(
            idx=[idx[rows] for idx in kept_idx or ()],
            residual_BLCv=torch.zeros(len(chunk), P * P, Cv) if discrete_only else None)
        with torch.no_grad():
            cond = pipe.encode_prompt([p for _, p, _ in chunk], pipe._execution_device)
            f_hat = pipe.scale_loop(cond, None, SamplingOptions(guidance_scale=guidance_scale), generator=gens,
                                    forced=forced)
            images += pipe.finish(f_hat, "pil", True).images
    return images


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> `(B, 3, H, W)` in [-1, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                        for im in images])


def tokenizer_psnr(vae, folder: Path, n: int):
    from PIL import Image

    files = sorted(folder.glob("*.png"))[:n]
    hyb, disc = [], []
    for i in range(0, len(files), 50):
        x = to_tensor(Image.open(f) for f in files[i: i + 50])
        with torch.no_grad():
            idx, residual = vae.img_to_tokens(x)
            hyb.append(psnr(vae.tokens_to_img(idx, residual), x))
            disc.append(psnr(vae.tokens_to_img(idx, None), x))
    return {"images": len(files), "psnr_hybrid_db": float(torch.cat(hyb).mean()),
            "psnr_discrete_db": float(torch.cat(disc).mean())}


def grid(images, cols: int):
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    g = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        g.paste(im, ((i % cols) * w, (i // cols) * h))
    return g


GRID_PROMPTS = [
    "a red circle on a blue background", "a green square in the top left corner", "three yellow triangles",
    "a purple square above an orange circle", "a small blue triangle and a large white circle",
    "a black circle on a yellow background", "a red square to the left of a green triangle",
    "two blue circles",
]


def evaluate(work: Path, cfg: dict) -> None:
    from hart.eval.shapes_eval import HELDOUT_PROMPTS_PATH, load_prompts, score
    from hart.eval.text_probe import wording_report

    pipe = load_pipeline(work / "pipeline")
    records = load_prompts()
    if cfg.get("eval_prompts"):
        records = records[: cfg["eval_prompts"]]
    seeds = list(range(cfg["eval_seeds"]))
    report = {"guidance_scale": cfg["guidance_scale"], "seeds_per_prompt": len(seeds), "prompts": len(records)}
    out = work / "eval"
    out.mkdir(parents=True, exist_ok=True)
    heldout = load_prompts(HELDOUT_PROMPTS_PATH)[: len(records)]  # the same scenes in held-out wordings
    for key, recs, discrete in (("hybrid", records, False), ("discrete_only", records, True),
                                ("heldout", heldout, False)):
        t0 = time.time()
        images = generate(pipe, [r["prompt"] for r in recs], seeds, cfg["guidance_scale"], discrete)
        per_image = [r for r in recs for _ in seeds]  # prompt-major, as generated
        report[f"shapes_eval_{key}"] = score(images, per_image)
        report[f"seconds_per_image_{key}"] = (time.time() - t0) / len(images)
        folder = out / key
        folder.mkdir(exist_ok=True)
        for r, s, im in zip(per_image, seeds * len(recs), images):
            im.save(folder / f"{r['index']:05d}_{s}.png")
        print(key, json.dumps(report[f"shapes_eval_{key}"]), flush=True)
    report["tokenizer"] = tokenizer_psnr(pipe.vae, work / "data" / "heldout", cfg["heldout_images"])
    print("tokenizer", json.dumps(report["tokenizer"]), flush=True)
    # what the text features carry: a fact probe's accuracy on template, grammar and held-out wordings
    report["text_probe"] = wording_report(pipe.text_encoder, pipe.tokenizer, **cfg["probe"])
    print("text probe", json.dumps({k: round(v["all"], 3) for k, v in report["text_probe"].items()}), flush=True)
    # latency of one 128 px image (after one warm-up call)
    pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    for s in range(3):
        pipe("a red circle on a blue background", guidance_scale=cfg["guidance_scale"],
             generator=torch.Generator().manual_seed(s))
    report["seconds_per_single_image"] = (time.time() - t0) / 3
    c0 = time.process_time()
    for s in range(3):
        pipe("a red circle on a blue background", guidance_scale=cfg["guidance_scale"],
             generator=torch.Generator().manual_seed(s))
    report["cpu_seconds_per_single_image"] = (time.process_time() - c0) / 3
    report["torch_threads"] = torch.get_num_threads()
    grid(generate(pipe, GRID_PROMPTS, [0, 1], cfg["guidance_scale"]), 4).save(out / "grid.png")
    report["pipeline_mb"] = round(sum(f.stat().st_size for f in (work / "pipeline").rglob("*") if f.is_file()) / 2**20, 2)
    (work / "report.json").write_text(json.dumps(report, indent=2))


def diagnose(work: Path, cfg: dict) -> None:
    """Which scales the transformer gets wrong: ShapesEval (seed 0) when the first K scales are those of
    each prompt's ground-truth render and the rest is sampled, for K = 0 (plain generation) to S - 1
    (only the last scale sampled), next to the score of the tokenizer's own reconstructions of those
    renders (the ceiling). `WORK/diagnose.json`."""
    from hart.data.shapes import Scene, render
    from hart.eval.shapes_eval import load_prompts, score

    pipe = load_pipeline(work / "pipeline")
    records = load_prompts()[: cfg.get("eval_prompts")]
    x = to_tensor(render(Scene.from_dict(r["scene"])) for r in records)
    with torch.no_grad():
        idx, residual = pipe.vae.img_to_tokens(x)
        to_pil = lambda decoded: pipe.image_processor.postprocess(decoded, output_type="pil")  # as the pipeline
        report = {"prompts": len(records), "guidance_scale": cfg["guidance_scale"],
                  "reconstruction_hybrid": score(to_pil(pipe.vae.tokens_to_img(idx, residual)), records),
                  "reconstruction_discrete": score(to_pil(pipe.vae.tokens_to_img(idx, None)), records),
                  "kept_scales": {}}
    prompts = [r["prompt"] for r in records]
    for k in range(len(idx)):
        images = generate(pipe, prompts, [0], cfg["guidance_scale"], kept_idx=idx[:k])
        report["kept_scales"][k] = score(images, records)
        print(f"first {k} scales kept: {json.dumps(report['kept_scales'][k])}", flush=True)
    (work / "diagnose.json").write_text(json.dumps(report, indent=2))


def _images_per_second(step, batch_size: int, steps: int, warmup_steps: int):
    """(images per wall second, images per CPU second of this process): on a shared machine the second
    shows what the cores would give if they were not shared."""
    for _ in range(warmup_steps):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - t0), batch_size * steps / (time.process_time() - c0)


def throughput(work: Path, cfg: dict) -> None:
    """Training speed of the recipe's models on this machine: forward + backward of a batch of the
    transformer (HART loss on cached-example shapes: text features, tokens, residual) and of the text
    model (causal LM loss over `text_tokens` pieces), fp32 and bf16 autocast, images (captions) per second.
    Weights and inputs are random: the speed depends on the shapes only. `WORK/throughput.json`."""
    from transformers import Qwen2ForCausalLM

    from hart import HARTTransformer, HybridTokenizer
    from hart.data.text_model import qwen2_config
    from hart.training.encoding import loss_inputs
    from hart.training.objective import hart_loss

    t, tc = cfg["throughput"], cfg["text"]
    B, gen = t["batch_size"], torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vae = HybridTokenizer(**cfg["tokenizer"])
    tr = HARTTransformer(context_dim=tc["hidden"], **cfg["transformer"])
    lm = Qwen2ForCausalLM(qwen2_config(tc["vocab_size"], tc["hidden"], tc["layers"], tc["heads"], 256))
    L, P, T = sum(p * p for p in PATCH_NUMS), PATCH_NUMS[-1], cfg["transformer"]["context_tokens"]
    batch = {"features": torch.randn(B, T, tc["hidden"]), "mask": torch.ones(B, T, dtype=torch.bool),
             "tokens": torch.randint(cfg["tokenizer"]["vocab_size"], (B, L)),
             "residual": 0.1 * torch.randn(B, P * P, cfg["tokenizer"]["latent_channels"])}
    inputs = loss_inputs(batch, vae.quantize, PATCH_NUMS)
    ids_BT = torch.randint(4, tc["vocab_size"], (B, t["text_tokens"]))

    def transformer_step():
        tr.zero_grad(set_to_none=True)
        hart_loss(tr, vae.quantize, *inputs, generator=gen).loss.backward()

    def text_step():
        lm.zero_grad(set_to_none=True)
        lm(input_ids=ids_BT, labels=ids_BT).loss.backward()

    report = {"threads": torch.get_num_threads(), "batch_size": B, "steps": t["steps"], "load_average": os.getloadavg(),
              "images_per_s": {}, "images_per_cpu_s": {}}
    for name, step in (("transformer", transformer_step), ("text_model", text_step)):
        for dtype in ("float32", "bfloat16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                wall, cpu = _images_per_second(step, B, t["steps"], t["warmup_steps"])
            report["images_per_s"][f"{name}_{dtype}"] = round(wall, 1)
            report["images_per_cpu_s"][f"{name}_{dtype}"] = round(cpu, 1)
            print(f"{name} {dtype}: {wall:.1f} images/s, {cpu:.1f} images per CPU-s "
                  f"(batch {B}, {torch.get_num_threads()} threads)", flush=True)
    (work / "throughput.json").write_text(json.dumps(report, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (data, runs, pipeline, report)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every phase")
    p.add_argument("--redo", action="append", default=[], help="run this phase again even if its output exists")
    p.add_argument("--only", help="comma-separated phases to run (the others are skipped), e.g. `--only decoder` "
                                  "in a second process while the first runs init,cache,transformer")
    p.add_argument("--install", action="store_true", help="copy WORK/pipeline to hart/bundled/shapes-128")
    p.add_argument("--tok_steps", type=int, help="tokenizer steps (default: the recipe's)")
    p.add_argument("--transformer_size", choices=sorted(SIZES), default="small",
                   help="the transformer's dimensions, learning rate and steps (default small: the shipped model's)")
    p.add_argument("--ft_steps", type=int, help="transformer steps (default: those of --transformer_size)")
    p.add_argument("--ft_lr", type=float,
                   help="transformer learning rate (default: that of --transformer_size). With --grammar_variants 2 "
                        "--text_facts the small transformer stalls at its 2e-3 (docs/bundled_model.md): use 1e-3")
    p.add_argument("--grammar_variants", type=int, metavar="K",
                   help="caption the training set with the caption grammar, K captions per image (default 0: the "
                        "fixed templates); the cache, and its caching time, grow K-fold")
    p.add_argument("--text_facts", action="store_true",
                   help="train the text model on template and grammar captions of its own scenes, after the "
                        "system prompt, with the fact loss (hart.data.facts)")
    p.add_argument("--no_refine_decoder", dest="refine_decoder", action="store_false",
                   help="skip the refine phase: the decoder of the decoder phase is shipped (ShapesEval 0.388 "
                        "instead of 0.414 on 8 seeds, docs/bundled_model.md)")
    args = p.parse_args(argv)
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.tok_steps:
        cfg["tok_train"]["max_steps"] = args.tok_steps
    size = SIZES[args.transformer_size]
    cfg["transformer"].update(size["transformer"])
    if not args.quick:  # --quick keeps its toy step count
        cfg["ft_train"].update(lr=size["lr"], max_steps=size["max_steps"])
    if args.ft_steps:
        cfg["ft_train"]["max_steps"] = args.ft_steps
    if args.ft_lr is not None:
        if not args.ft_lr > 0:
            p.error(f"--ft_lr must be positive, got {args.ft_lr}")
        cfg["ft_train"]["lr"] = args.ft_lr
    if args.grammar_variants is not None:
        if args.grammar_variants < 0:
            p.error("--grammar_variants must be 0 or more")
        cfg["grammar_variants"] = args.grammar_variants
    cfg["text_facts"] = args.text_facts
    cfg["refine_decoder"] = args.refine_decoder
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(cfg, indent=2))
    print(f"torch threads: {torch.get_num_threads()} (set OMP_NUM_THREADS to change)", flush=True)
    ph = Phases(work, args.redo, None if args.only is None else args.only.split(","))
    ph.run("data", work / "data" / "ft" / "metadata.jsonl", lambda: make_data(work, cfg))
    ph.run("text", work / "text_model" / "config.json", lambda: train_text(work, cfg))
    ph.run("tokenizer", work / "runs" / "tok" / "tokenizer", lambda: train_tok(work, cfg))
    ph.run("decoder", work / "runs" / "dec" / "tokenizer", lambda: train_decoder(work, cfg))
    ph.run("init", work / "init_pipeline" / "model_index.json", lambda: build_init(work, cfg))
    ph.run("cache", work / "cache", lambda: build_cache(work, cfg))
    ph.run("transformer", work / "runs" / "ft" / "pipeline" / "model_index.json", lambda: train_transformer(work, cfg))
    if cfg["refine_decoder"]:
        ph.run("refine", work / "runs" / "refine" / "tokenizer", lambda: refine(work, cfg))
    ph.run("assemble", work / "pipeline" / "model_index.json", lambda: assemble(work, cfg))
    ph.run("eval", work / "report.json", lambda: evaluate(work, cfg))
    ph.run("diagnose", work / "diagnose.json", lambda: diagnose(work, cfg))
    if ph.only and "throughput" in ph.only:
        ph.run("throughput", work / "throughput.json", lambda: throughput(work, cfg))
    total = sum(t["cpu_s"] for t in ph.times.values())
    print("CPU time per phase:", json.dumps(ph.times), f"total {total:.0f} s", flush=True)
    if args.install:
        dst = REPO / "hart" / "bundled" / "shapes-128"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(work / "pipeline", dst)
        print(f"installed {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
