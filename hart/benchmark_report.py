"""`hart benchmark`'s figures as text and as a chart (the schema: `hart.benchmark`)."""
from __future__ import annotations

from typing import Dict

def format_summary(result: Dict[str, object]) -> str:
    """The figures of `run_benchmark` as text, one block per batch size."""
    f, peak = result["flops_per_image"], result["matmul_peak"]
    stages = ("text_encoding", "transformer", "diffusion", "decoding", "other")
    lines = [f"{result['config']} ({result['image_size']} px, text: {result['text_features']}) {result['dtype']} on "
             f"{result['device_name']}; built in {result['build_s']:.1f} s",
             f"matmul peak {peak['flops_per_s'] / 1e12:.2f} TFLOP/s ({peak['size']}^2); GFLOP per image: "
             + ", ".join(f"{k} {f[k] / 1e9:.1f}" for k in (*stages[:-1], "total"))]
    for run in result["runs"]:
        s, frac, cuda = run["stages_s"], run["fraction_of_matmul_peak"], run["cuda_max_allocated_mib"]
        options = ", ".join(f"{k} {v}" for k, v in run["options"].items())
        speedup = f", {run['speedup']:.2f}x plain" if "speedup" in run else ""
        first = run.get("warmup_s_all", [])
        compiling = f" (first call, compiling: {first[0]:.1f} s)" if first and run["options"]["compile"] else ""
        lines += [f"{run['name']} ({options}) batch {run['batch_size']}: {run['latency_s']:.3f} s{speedup}{compiling}, "
                  f"{run['images_per_s']:.3g} images/s, peak RSS "
                  f"{run['peak_rss_mib']:.0f} MiB" + (f", CUDA max allocated {cuda:.0f} MiB" if cuda else ""),
                  "  stages (s): " + ", ".join(f"{k} {s[k]:.3f}" for k in stages),
                  "  scales (ms): " + ", ".join(f"{p}x{p} {t * 1000:.1f}" for p, t in zip(result["patch_nums"],
                                                                                   s["transformer_scales"])),
                  f"  transformer {run['achieved_flops_per_s']['transformer'] / 1e12:.3g} TFLOP/s = "
                  f"{100 * frac['transformer']:.1f}% of the matmul peak (end to end {100 * frac['end_to_end']:.1f}%)"]
    return "\n".join(lines)


_COLOURS = dict(text_encoding=(91, 143, 201), transformer=(235, 140, 52), diffusion=(98, 175, 92),
                decoding=(196, 78, 82), other=(150, 150, 150))


def write_chart(result: Dict[str, object], path) -> None:
    """Horizontal bars of the median stage times, one panel per batch size (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows_per_panel = 4 + len(result["runs"][0]["stages_s"]["transformer_scales"])
    width, label_w, row_h, head_h = 900, 190, 18, 28
    height = 10 + len(result["runs"]) * (head_h + rows_per_panel * row_h + 10)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    y = 10
    for run in result["runs"]:
        s = run["stages_s"]
        rows = [("text encoding", s["text_encoding"], "text_encoding")]
        rows += [(f"transformer {p}x{p}" + (" + text" if i == 0 else ""), v, "transformer")
                 for i, (p, v) in enumerate(zip(result["patch_nums"], s["transformer_scales"]))]
        rows += [("residual diffusion", s["diffusion"], "diffusion"), ("decoding", s["decoding"], "decoding"),
                 ("other", max(s["other"], 0.0), "other")]
        draw.text((10, y), f"{result['config']} {result['dtype']} {result['device']} (text: {result['text_features']}), "
                  f"{run['name']}, batch {run['batch_size']}: {run['latency_s']:.3f} s, {run['images_per_s']:.3g} images/s",
                  fill="black", font=font)
        y += head_h
        longest = max(v for _, v, _ in rows) or 1.0
        for label, value, kind in rows:
            draw.text((10, y + 3), label, fill="black", font=font)
            bar = int((width - label_w - 110) * value / longest)
            draw.rectangle((label_w, y + 2, label_w + max(bar, 1), y + row_h - 3), fill=_COLOURS[kind])
            draw.text((label_w + bar + 6, y + 3), f"{value * 1000:.1f} ms", fill="black", font=font)
            y += row_h
        y += 10
    image.save(path)
