"""Speed of the parts of the image path, as ratios within one run (interleaved calls, median and min).

    python scripts/speed_parts.py matmul       # bf16 vs fp32 GEMMs at the 0.7B model's shapes
    python scripts/speed_parts.py int8         # int8 (torchao) vs fp32 vs bf16 Linear at those shapes
    python scripts/speed_parts.py decoder [--side 16]     # tokenizer decoder, fp32 vs bf16, channels-last
    python scripts/speed_parts.py head [--side 16]        # diffusion head's guided sampling, fp32 vs bf16
    python scripts/speed_parts.py text-keys    # attention over 300 padded text keys vs the merged ones
    python scripts/speed_parts.py int8-quality [--prompts 64 --seeds 2]  # ShapesEval, bundled model

Every figure names the CPU flags, the thread count and the dtypes. On a shared machine the median
moves with the neighbours' load; the minimum is the least disturbed call, so both are printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hart import limits  # noqa: E402
from hart.device import auto_dtype, cpu_capabilities  # noqa: E402

SHAPES_0_7B = {"qkv": (1536, 4608), "proj": (1536, 1536), "gate/up": (1536, 4096), "down": (4096, 1536)}


def race(fns: dict, repeats: int) -> dict:
    """Interleaved timings of each callable (one warm-up each): {name: (median_s, min_s)}."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def report(title: str, results: dict, baseline: str) -> None:
    base_med, base_min = results[baseline]
    print(title)
    for name, (med, mn) in results.items():
        print(f"  {name:28s} median {med * 1e3:9.1f} ms  min {mn * 1e3:9.1f} ms   "
              f"{baseline}/this: {base_med / med:5.2f}x (median) {base_min / mn:5.2f}x (min)")


def header(args) -> None:
    caps = cpu_capabilities()
    flags = [f for f in ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if caps.get(f)]
    print(f"CPU {caps.get('cpu_name', '?')} flags {' '.join(flags)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; --dtype auto: {auto_dtype('cpu').reason}")
    print("command: python scripts/speed_parts.py " + " ".join(sys.argv[1:]))


@torch.no_grad()
def matmul(args) -> None:
    for name, (k, n) in SHAPES_0_7B.items():
        x = torch.randn(args.tokens, k)
        w = torch.randn(n, k) / k**0.5
        xb, wb = x.bfloat16(), w.bfloat16()
        report(f"{name}: ({args.tokens} x {k}) @ ({k} x {n})",
               race({"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb)}, args.repeats), "fp32")


@torch.no_grad()
def int8(args) -> None:
    from hart.quantize import _torchao_int8

    quantize_, Int8Config = _torchao_int8()
    for name, (k, n) in SHAPES_0_7B.items():
        lin = torch.nn.Linear(k, n, bias=False)
        q = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
        q[0].weight.copy_(lin.weight)
        quantize_(q, Int8Config())
        lin_bf16 = torch.nn.Linear(k, n, bias=False).bfloat16()
        x = torch.randn(args.tokens, k)
        xb = x.bfloat16()
        err = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
        report(f"{name}: ({args.tokens} x {k}) -> {n}; int8 relative error {err:.4f}",
               race({"fp32": lambda: lin(x), "int8": lambda: q(x), "bf16": lambda: lin_bf16(xb)},
                    args.repeats), "fp32")


@torch.no_grad()
def decoder(args) -> None:
    from hart import HybridTokenizer
    from hart.benchmark import _random_module

    cpu = torch.device("cpu")
    z = torch.randn(1, 32, args.side, args.side)
    vaes = {name: _random_module(lambda: HybridTokenizer(patch_nums=(1, 2, 4)), dtype, cpu, seed=2)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    fns = {name: (lambda v=v: v.decode_latent(z.to(v.dtype))) for name, v in vaes.items()}
    # random weights: only the speed means something here, not the bf16 vs fp32 pixel difference
    report(f"released tokenizer's decoder (random weights, channels-last), latent {args.side} x {args.side} "
           f"({args.side * 16} px)", race(fns, args.repeats), "fp32")


@torch.no_grad()
def head(args) -> None:
    from hart.benchmark import _random_module
    from hart.models.diffusion import DiffusionHead

    cpu, n = torch.device("cpu"), args.side**2
    z = torch.randn(2 * n, 1536)  # the 0.7B transformer's width, both guidance rows of each token
    heads = {name: _random_module(lambda: DiffusionHead(32, 1536), dtype, cpu, seed=3)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    fns = {name: (lambda h=h: h.sample(z[:n], z[n:], 4.5, generator=torch.Generator().manual_seed(0)))
           for name, h in heads.items()}
    report(f"released diffusion head (width 1024, depth 6, 8 steps, random weights), guided, {n} tokens "
           f"({args.side * 16} px)", race(fns, args.repeats), "fp32")


@torch.no_grad()
def text_keys(args) -> None:
    from hart.text import TextConditioning
    from hart.text_keys import attention_bias, compact_text

    T, real = 300, args.prompt_tokens
    feats = torch.randn(1, T, 8)
    feats[:, real:] = feats[:, real]
    mask = torch.arange(T).unsqueeze(0) < real
    cond = TextConditioning(feats, mask, mask.long().cumsum(1) - 1)
    _, _, key_bias = compact_text(cond, TextConditioning.unconditional(1, T, 8, "cpu"))
    Tc = key_bias.shape[1]
    for dtype in (torch.float32, torch.bfloat16):
        for side, image_keys, heads in ((36, 3051, 24), (64, 9451, 24), (16, 585, 8)):
            q = torch.randn(2, heads, side * side, 64, dtype=dtype)
            k_full = torch.randn(2, heads, T + image_keys, 64, dtype=dtype)
            k_merged = k_full[:, :, T - Tc:].contiguous()
            bias = attention_bias(key_bias, Tc + image_keys, dtype)
            report(f"{str(dtype)[6:]} attention at a {side} x {side} scale over {image_keys} image keys: "
                   f"300 text keys vs {Tc} ({real}-token prompt), 2 CFG rows, {heads} heads",
                   race({"300 text keys": lambda: F.scaled_dot_product_attention(q, k_full, k_full, scale=0.03),
                         f"{Tc} keys + bias": lambda: F.scaled_dot_product_attention(
                             q, k_merged, k_merged, attn_mask=bias, scale=0.03)}, args.repeats),
                   "300 text keys")


@torch.no_grad()
def int8_quality(args) -> None:
    """ShapesEval of the bundled model with float and int8 block projections, same prompts and seeds."""
    import copy

    import numpy as np

    from hart import HARTPipeline
    from hart.bundled import BUNDLED_MODEL
    from hart.eval.shapes_eval import load_prompts, score
    from hart.quantize import quantize_transformer_int8

    pipe = HARTPipeline.from_pretrained(BUNDLED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    records = load_prompts()[: args.prompts]
    jobs = [(r, s) for r in records for s in range(args.seeds)]
    guidance = limits.GUIDANCE_SCALE

    def images(p):
        out = []
        for i in range(0, len(jobs), 64):
            chunk = jobs[i: i + 64]
            gens = [torch.Generator().manual_seed(s) for _, s in chunk]
            out += list(p([r["prompt"] for r, _ in chunk], guidance_scale=guidance, generator=gens, output_type="np").images)
        return out

    t0 = time.perf_counter()
    float_images = images(pipe)
    t_float = time.perf_counter() - t0
    q = copy.copy(pipe)
    q.transformer = quantize_transformer_int8(copy.deepcopy(pipe.transformer))
    t0 = time.perf_counter()
    int8_images = images(q)
    t_int8 = time.perf_counter() - t0
    specs = [r for r, _ in jobs]
    to_u8 = lambda ims: [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in ims]  # noqa: E731
    s_float, s_int8 = score(to_u8(float_images), specs), score(to_u8(int8_images), specs)
    mse = [float(np.mean((a - b) ** 2)) for a, b in zip(float_images, int8_images)]
    psnr = statistics.median(10 * np.log10(1 / max(m, 1e-12)) for m in mse)
    print(f"bundled model, {len(records)} prompts x {args.seeds} seeds, guidance {guidance}, fp32 activations")
    print(f"  ShapesEval overall: float {s_float['overall']:.4f}  int8 {s_int8['overall']:.4f}  "
          f"change {s_int8['overall'] - s_float['overall']:+.4f}")
    print(f"  same-seed image PSNR int8 vs float: median {psnr:.1f} dB; wall {t_float:.0f} s float, {t_int8:.0f} s int8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("matmul", "int8", "decoder", "head", "text-keys", "int8-quality"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=2 * 1296, help="GEMM rows (default: the 36 x 36 scale, 2 CFG rows)")
    p.add_argument("--side", type=int, default=16, help="decoder/head latent side (16: 256 px; 64: 1024 px)")
    p.add_argument("--prompt-tokens", type=int, default=30)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    header(args)
    {"matmul": matmul, "int8": int8, "decoder": decoder, "head": head, "text-keys": text_keys,
     "int8-quality": int8_quality}[args.part](args)


if __name__ == "__main__":
    main()
