"""Peak resident memory of loading a pipeline in a dtype, and of one image after it (text encoder excluded).

    python scripts/load_memory.py --config medium --dtype bf16 --image
    python scripts/load_memory.py --config hart-0.7b-1024 --dtype bf16
    python scripts/load_memory.py --config medium --dtype bf16 --pickle   # llm/ema_model.bin, as released
    python scripts/load_memory.py --config hart-0.7b-1024 --dtype bf16 --image --prune 0.25 --layout pipeline
    python scripts/load_memory.py --config hart-0.7b-1024 --dtype fp32 --int8 --image --prune 0.25 --layout pipeline
    python scripts/load_memory.py --config hart-0.7b-1024 --dtype fp32 --image --prune 0.25 --bf16-cache --layout pipeline

A benchmark configuration's transformer (with its diffusion head) and tokenizer are built with random
weights and saved in fp32, as released, both in this package's layout (`transformer/`, `vae/`, as
`HARTPipeline.from_pretrained` reads them) and in the official one (`llm/`, `tokenizer/`). Each layout
is then loaded in `--dtype` in a fresh process, whose peak RSS (`ru_maxrss`) is printed: after the
imports, after loading, with `--int8` after quantizing the transformer blocks (`hart.quantize`, needs
torchao), and with `--image` after one image from random text features (guidance 4.5; `--prune` and
`--bf16-cache` as the pipeline's). `--layout` measures one layout only.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = ("pipeline", "official")
DTYPES = ("fp32", "bf16")
CONFIGS = ("medium", "hart-0.7b-512", "hart-0.7b-1024", "tiny")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save(config: str, folder: Path, pickle: bool) -> None:
    """The configuration's random fp32 weights in both layouts (with `pickle`, also `llm/ema_model.bin`)."""
    import torch
    from safetensors.torch import save_file

    from hart import HARTTransformer, HybridTokenizer
    from hart import benchmark as bench

    cfg = bench.CONFIGS[config]
    transformer = bench._random_module(lambda: HARTTransformer(**cfg.transformer), torch.float32, torch.device("cpu"), 1)
    vae = bench._random_module(lambda: HybridTokenizer(**cfg.vae), torch.float32, torch.device("cpu"), 2)
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    t = transformer.config
    (folder / "llm").mkdir()
    (folder / "llm" / "config.json").write_text(json.dumps(dict(
        patch_nums=list(t.patch_nums), context_token=t.context_tokens, context_dim=t.context_dim,
        embed_dim=t.embed_dim, depth=t.depth, num_heads=t.num_heads, mlp_ratio=t.mlp_ratio,
        use_context_norm=t.use_context_norm, diff_width=t.diff_width, diff_depth=t.diff_depth)))
    llm = {k.replace("diffusion_head.", "diffloss.", 1): v.contiguous() for k, v in transformer.state_dict().items()}
    save_file(llm, folder / "llm" / "model.safetensors")
    if pickle:  # the release's EMA weights, which the official loader prefers
        torch.save(llm, folder / "llm" / "ema_model.bin")
    v = vae.config
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "config.json").write_text(json.dumps(dict(
        vocab_size=v.vocab_size, z_channels=v.latent_channels, ch=v.base_channels, ch_mult=list(v.channel_multipliers),
        v_patch_nums=list(v.patch_nums), quantizer_type="var_hybrid", share_quant_resi=v.num_phi)))
    sd = {k.replace("quantize.phi.", "quantize.quant_resi.qresi_ls.", 1): t for k, t in vae.state_dict().items()}
    save_file({k: t.contiguous() for k, t in sd.items()}, folder / "tokenizer" / "model.safetensors")


def measure(folder: Path, layout: str, dtype: str, image: bool, prune: float, int8: bool, bf16_cache: bool) -> dict:
    """Peak RSS in this process: after the imports, after loading, after quantizing, after one image."""
    import torch

    from hart import HARTPipeline, HARTTransformer, HybridTokenizer, loading
    from hart import benchmark as bench

    figures = dict(imports_mib=peak_mib())
    torch_dtype = bench.DTYPES[dtype]
    if layout == "pipeline":
        transformer = HARTTransformer.from_pretrained(folder / "transformer", torch_dtype=torch_dtype)
        vae = HybridTokenizer.from_pretrained(folder / "vae", torch_dtype=torch_dtype)
    else:
        transformer = loading.load_official_transformer(folder / "llm", torch_dtype=torch_dtype)
        vae = loading.load_official_tokenizer(folder / "tokenizer", torch_dtype=torch_dtype)
    assert {p.dtype for p in (*transformer.parameters(), *vae.parameters())} == {torch_dtype}
    figures["loaded_mib"] = peak_mib()
    if int8:
        from hart.quantize import quantize_transformer_int8

        quantize_transformer_int8(transformer.eval())
        figures["int8_mib"] = peak_mib()
    if image:
        pipe = HARTPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae)
        pipe.set_progress_bar_config(disable=True)
        t = transformer.config
        pipe.encode_prompt = lambda prompts, device=None, **kw: bench.random_text_conditioning(
            len(prompts), t.context_tokens, t.context_dim, "cpu")
        pipe("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt", prune=prune,
             bf16_cache=bf16_cache)
        figures["image_mib"] = peak_mib()
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="medium", choices=CONFIGS)
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--image", action="store_true", help="also generate one image after loading")
    p.add_argument("--prune", type=float, default=1.0, help="the image's token pruning (default 1, off)")
    p.add_argument("--int8", action="store_true", help="quantize the transformer blocks to int8 after loading")
    p.add_argument("--bf16-cache", action="store_true", help="the image's attention and pruning caches in bf16")
    p.add_argument("--pickle", action="store_true", help="official layout: the transformer from a torch pickle")
    p.add_argument("--layout", choices=LAYOUTS, help="measure this layout only (default: both)")
    p.add_argument("--folder", help=argparse.SUPPRESS)  # internal: save into / measure this folder
    p.add_argument("--save", action="store_true", help=argparse.SUPPRESS)  # internal: save the weights
    args = p.parse_args()
    if args.save:
        return save(args.config, Path(args.folder), args.pickle)
    if args.folder:
        print(json.dumps(measure(Path(args.folder), args.layout, args.dtype, args.image, args.prune, args.int8,
                                 args.bf16_cache)))
        return
    # This process imports no torch and the work runs in children: a child's ru_maxrss starts at its
    # parent's resident size (Linux keeps the pre-exec high-water mark), which must stay small.
    print(f"{args.config}, weights saved in fp32, loaded in {args.dtype}{', blocks in int8' if args.int8 else ''}"
          f"{', caches in bf16' if args.bf16_cache else ''}; "
          "peak RSS (ru_maxrss), MiB")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--config", args.config, "--folder", tmp, "--save"]
                       + (["--pickle"] if args.pickle else []), check=True)
        for layout in [args.layout] if args.layout else LAYOUTS:
            cmd = [sys.executable, __file__, "--config", args.config, "--dtype", args.dtype, "--folder", tmp,
                   "--layout", layout, "--prune", str(args.prune)] + (["--image"] if args.image else []) \
                + (["--int8"] if args.int8 else []) + (["--bf16-cache"] if args.bf16_cache else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            print(f"  {layout:9s} " + ", ".join(f"{k[:-4]} {v:.0f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
