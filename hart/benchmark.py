"""`hart benchmark`: speed, memory and FLOPs of generation, stage by stage, for the released sizes.

`run_benchmark` builds a pipeline (released architecture with random weights, or the bundled model),
times `HARTPipeline.__call__` (median of `iters` calls after `warmup`, device synchronised at every mark)
stage by stage, and measures the matmul peak before and after, keeping the better reading (one taken in a
busy moment of a shared machine would inflate every fraction). Result (benchmark.json; s, MiB):

    config, dtype, device, device_name, torch_version, hart_version, warmup, iters, compile, compare,
    text_features ("text model" | "random"), image_size, patch_nums, build_s, build_peak_rss_mib (process peak
    after building the pipeline), parameters: {transformer, diffusion_head (part of transformer), vae,
    text_encoder}, matmul_peak: {size, seconds, flops_per_s}, flops_per_image: {text_encoding, transformer,
    transformer_scales: [per scale], diffusion, decoding, total, compacted_text_tokens}, runs: [{name, options:
    {compact_text, prune, int8, compile, bf16_head_decoder, bf16_cache}, speedup (--compare:
    plain's latency over this run's, same batch size), flops_per_image: {transformer, total} (this run's
    options), batch_size, latency_s (median), latency_s_all, images_per_s, stages_s: {text_encoding,
    transformer, transformer_scales, diffusion, decoding, other}, peak_rss_mib (process peak so far),
    rss_increase_mib (during this batch size's calls), cuda_max_allocated_mib (null off CUDA),
    achieved_flops_per_s and fraction_of_matmul_peak: {transformer, end_to_end}, warmup_s_all (the untimed
    calls' latencies: a compiled run's first one includes compilation)}]

`--compare` times three runs of one pipeline, their calls interleaved (docs/benchmark.md): `plain` (no option),
`exact` (every option that changes results only by float rounding: text-key compaction, the diffusion
head and decoder in bf16 in an fp32 run where the device multiplies bf16 natively, and compiled blocks
unless `compile_model` is False) and `fast` (exact, plus pruning at `hart.pruning.DEFAULT_KEEP` and, where the dtype is
fp32 because the CPU has no native bf16, int8 block projections). Without it, one run ("single") with
the options given. Each run's fractions of the peak count the FLOPs that run does (fewer text keys, pruned tokens).

Scale 0 includes the text prefix (300 tokens) and the conditioning; the last scale excludes the
residual diffusion; "other" is the rest of the call (argument checks, conversion to PIL). FLOPs
count multiply-adds as 2: analytic for the transformer and the diffusion head (`analytic_flops`,
equal to torch's count of a sampling call), counted (`torch.utils.flop_counter`) for the text model
and the decoder. `hart.benchmark_report` prints the figures and draws the stage times.
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from hart.benchmark_runs import models_for, run_options
from hart.device import CompilerMissing
from hart.pruning import num_kept, pruned_scales

PROMPTS = ("a red fox in the snow", "a lighthouse on a cliff at sunset, oil painting",
           "a bowl of ramen, studio photo", "an astronaut riding a horse on the moon")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANDOM_TEXT_TOKENS = 32  # real (unpadded) tokens of the random text features


class BenchmarkError(ValueError):
    """Bad benchmark input (unknown configuration, model not available): a one-line message."""


@dataclass(frozen=True)
class BenchConfig:
    """A model size: HARTTransformer, HybridTokenizer and Qwen2Config keyword arguments."""
    transformer: dict
    vae: dict
    text: dict


_QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
_SCALES_256 = (1, 2, 3, 4, 5, 7, 9, 12, 16)
_SCALES_512, _SCALES_1024 = (*_SCALES_256, 21, 27, 32), (*_SCALES_256, 21, 27, 36, 48, 64)
# The released 0.7B architecture (num_heads presumed 24, head dim 64: no shape depends on it).
_HART_0_7B = dict(context_tokens=300, context_dim=1536, embed_dim=1536, depth=16, num_heads=24, vocab_size=4096,
                  latent_channels=32, use_context_norm=True, diff_width=1024, diff_depth=6)
CONFIGS: Dict[str, BenchConfig] = {
    "hart-0.7b-1024": BenchConfig(dict(_HART_0_7B, patch_nums=_SCALES_1024), dict(patch_nums=_SCALES_1024), _QWEN2_1_5B),
    "hart-0.7b-512": BenchConfig(dict(_HART_0_7B, patch_nums=_SCALES_512), dict(patch_nums=_SCALES_512), _QWEN2_1_5B),
    # width 512, depth 8, 256 px, released tokenizer and diffusion head: CPU efficiency in seconds
    "medium": BenchConfig(
        dict(_HART_0_7B, embed_dim=512, depth=8, num_heads=8, patch_nums=_SCALES_256), dict(patch_nums=_SCALES_256),
        _QWEN2_1_5B),
    "tiny": BenchConfig(
        dict(patch_nums=(1, 2, 3, 4), context_tokens=300, context_dim=96, embed_dim=64, depth=2, num_heads=2,
             vocab_size=768, latent_channels=16, diff_width=64, diff_depth=2),
        dict(patch_nums=(1, 2, 3, 4), vocab_size=768, latent_channels=16, base_channels=32, channel_multipliers=(1, 2)),
        dict(vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=1, num_attention_heads=12,
             num_key_value_heads=2, tie_word_embeddings=True)),
}
CONFIG_NAMES = (*CONFIGS, "bundled")


def _word_tokenizer(texts: Sequence[str]):
    """A word-level tokenizer over the words of `texts` (tokenizer speed is not what is measured)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text.lower())})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<|endoftext|>", "<unk>", *words])}, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>")


def _random_module(factory: Callable[[], torch.nn.Module], dtype, device, seed: int) -> torch.nn.Module:
    """Build with parameters on `meta` (no init cost), then fill them cheaply and deterministically:
    matrices uniform in +-1/sqrt(fan_in), 1-D `weight`s (norms) ones, other 1-D parameters (biases) zeros."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = factory()
    gen = torch.Generator(device).manual_seed(seed)
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is None:
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if p.ndim >= 2:
                bound = p[0].numel() ** -0.5
                t.uniform_(-bound, bound, generator=gen)
            else:
                t.fill_(1.0 if name == "weight" else 0.0)
            sub._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    return module.to(device).eval()  # buffers (rotary frequencies) keep their dtype


def build_pipeline(name: str, dtype: torch.dtype, device: torch.device, random_text_features: bool = False):
    """HARTPipeline for a configuration: random weights, or the bundled model for "bundled"."""
    from hart import HARTPipeline, HARTTransformer, HybridTokenizer
    from hart.text import SYSTEM_PROMPT

    if name == "bundled":
        from hart.bundled import BUNDLED_MODEL
        if not (Path(BUNDLED_MODEL) / "model_index.json").is_file():
            raise BenchmarkError(f"the bundled model is missing from this install ({BUNDLED_MODEL})")
        pipe = HARTPipeline.from_pretrained(BUNDLED_MODEL).to(device, dtype)
    elif name in CONFIGS:
        cfg = CONFIGS[name]
        tokenizer = text_encoder = None
        if not random_text_features:
            from transformers import Qwen2Config, Qwen2Model

            tokenizer = _word_tokenizer([SYSTEM_PROMPT, *PROMPTS])
            text_encoder = _random_module(lambda: Qwen2Model(Qwen2Config(**cfg.text)), dtype, device, seed=0)
        transformer = _random_module(lambda: HARTTransformer(**cfg.transformer), dtype, device, seed=1)
        vae = _random_module(lambda: HybridTokenizer(**cfg.vae), dtype, device, seed=2)
        pipe = HARTPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)
    else:
        raise BenchmarkError(f"unknown configuration {name!r}; choose one of {', '.join(CONFIG_NAMES)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_text_conditioning(batch: int, tokens: int, dim: int, device):
    """Text features of the right shape, without a text model (float32, as `encode_prompt` returns): random
    for the first `RANDOM_TEXT_TOKENS` positions, then one random padding feature repeated, as a text
    model gives every pad the same feature (hart/text_keys.py)."""
    from hart.text import TextConditioning

    features = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(0))
    features[:, RANDOM_TEXT_TOKENS:] = features[:, -1:]
    mask = torch.arange(tokens).expand(batch, -1) < RANDOM_TEXT_TOKENS
    return TextConditioning(features.to(device), mask.to(device), (mask.cumsum(1) - 1).to(device))


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])  # Q K^T, then P V (torch lacks this CPU kernel)


def flop_counter() -> FlopCounterMode:
    """torch's counter (matmuls, convolutions, attention), also counting CPU attention."""
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})


def analytic_flops(t: dict, vae: dict, text_tokens: Optional[int] = None, keep: float = 1.0) -> Dict[str, object]:
    """Multiply-adds x 2 per image of `sample_scales` (guided: 2 rows per image, soft codes), from the configs;
    `text_tokens` after text-key compaction (None: all), `keep` the pruning fraction (the blocks' branches, and
    at a pruned last scale the residual diffusion, which runs on its pivotal tokens only)."""
    from hart.models.transformer import swiglu_hidden

    C, V, Cv, T, pn = t["embed_dim"], t["vocab_size"], t["latent_channels"], t["context_tokens"], t["patch_nums"]
    T, pruned = text_tokens or T, pruned_scales(pn, keep)
    F, W, P, S = swiglu_hidden(C, t["mlp_ratio"]), t["diff_width"], pn[-1], len(pn)
    diffused = num_kept(P, pruned[S - 1]) if S - 1 in pruned else P * P  # last-scale tokens the head runs on
    per_token = 2 * (3 * C * C + C * C + 3 * C * F)  # qkv, proj, SwiGLU
    phi = 2 * P * P * Cv * Cv * 9 if vae["num_phi"] > 0 and abs(vae["phi_ratio"]) > 1e-6 else 0
    scales, seen = [], 0
    for si, p in enumerate(pn):
        L = T if si == 0 else num_kept(p, pruned[si]) if si in pruned else p * p
        seen += L
        f = 2 * t["depth"] * (L * per_token + 4 * L * seen * C)  # blocks (attention)
        f += 2 * (2 * C * 2 * C + p * p * 2 * C * V) + p * p * 2 * V * Cv  # head (AdaLN, logits), soft codes
        if si == 0:
            f += 2 * T * 2 * t["context_dim"] * C + 2 * t["depth"] * 2 * C * 6 * C  # context_embed, blocks' AdaLN
        f += phi + pn[si + 1] ** 2 * 2 * Cv * C if si < S - 1 else 2 * diffused * 2 * Cv * C  # next input / diffusion condition
        scales.append(f)
    # per row and step: input, blocks, output; per step: the timestep's embedding (one row); per row: the
    # condition's embedding (once for all steps)
    per_row = 2 * (Cv * W + t["diff_depth"] * 5 * W * W + 2 * W * W + W * 2 * Cv)
    steps, rows = int(t["num_sampling_steps"]), 2 * diffused
    diffusion = steps * (rows * per_row + 2 * (256 * W + W * W)) + rows * 2 * C * W
    return dict(transformer_scales=scales, transformer=sum(scales), diffusion=diffusion)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, budget_s: float = 2.0) -> Dict[str, float]:
    """Best FLOP/s of square matmuls in `dtype`, growing the size (512 to 8192) while it fits in about `budget_s`."""
    start, best = time.perf_counter(), dict(size=0, seconds=0.0, flops_per_s=0.0)
    for n in (512, 1024, 2048, 4096, 8192):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b
        times = []
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - t)
        if 2 * n**3 / min(times) > best["flops_per_s"]:
            best = dict(size=n, seconds=min(times), flops_per_s=2 * n**3 / min(times))
        if time.perf_counter() - start + 4 * 8 * min(times) > budget_s:  # the next size: 4 calls, 8x the work
            break
    return best


class StageClock:
    """Times one `pipe(...)` call: text encoding, each scale (callback), diffusion, decoding."""

    def __init__(self, pipe, device: torch.device, text_fn: Optional[Callable] = None):
        self.pipe, self.device, self.text_fn = pipe, device, text_fn
        self.call_options: Dict[str, object] = {}  # the run's sampling options (compact_text, prune, bf16_cache)
        self.spans: Dict[str, tuple] = {}
        self.scale_ends: List[float] = []

    def now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def _timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = self.now()
            out = fn(*args, **kwargs)
            self.spans[name] = (start, self.now())
            return out
        return wrapper

    @contextlib.contextmanager
    def attached(self):
        pipe, head = self.pipe, self.pipe.transformer.diffusion_head
        pipe.encode_prompt = self._timed("text_encoding", self.text_fn or pipe.encode_prompt)
        pipe.decode_latent = self._timed("decoding", pipe.decode_latent)
        head.sample = self._timed("diffusion", head.sample)
        try:
            yield self
        finally:
            del pipe.encode_prompt, pipe.decode_latent, head.sample

    def run(self, prompts: List[str]) -> Dict[str, object]:
        self.spans, self.scale_ends = {}, []

        def on_scale(pipe, si, side, tensors):
            self.scale_ends.append(self.now())
            return {}

        start = self.now()
        self.pipe(prompt=prompts, generator=torch.Generator(self.device).manual_seed(0), output_type="pil",
                  callback_on_step_end=on_scale, callback_on_step_end_tensor_inputs=(), **self.call_options)
        total = self.now() - start
        (t0, t1), (d0, d1), (c0, c1) = (self.spans[k] for k in ("text_encoding", "diffusion", "decoding"))
        ends = [t1, *self.scale_ends]
        scales = [b - a for a, b in zip(ends, ends[1:])]
        scales[-1] -= d1 - d0  # the last scale's callback comes after the diffusion
        stages = dict(text_encoding=t1 - t0, transformer=sum(scales), diffusion=d1 - d0, decoding=c1 - c0)
        return dict(total=total, transformer_scales=scales, **stages, other=total - sum(stages.values()))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak of the process; Linux reports KiB

def _count_flops(pipe, text_fn, device) -> Dict[str, object]:
    """FLOPs per image: analytic for the transformer and diffusion, counted for text encoding and decoding;
    `compacted_text_tokens`: the first prompt's text positions after text-key compaction."""
    from hart.text import TextConditioning
    from hart.text_keys import compact_text

    tcfg = pipe.transformer.config
    flops = analytic_flops(tcfg, pipe.vae.config)
    with torch.no_grad():
        with flop_counter() as text:
            cond = (text_fn or pipe.encode_prompt)(list(PROMPTS[:1]), device)
        flops["compacted_text_tokens"] = compact_text(cond, TextConditioning.unconditional(
            1, *cond.features_BTC.shape[1:], device=cond.features_BTC.device))[0].features_BTC.shape[1]
        with flop_counter() as decoder:
            P = tcfg["patch_nums"][-1]
            pipe.decode_latent(torch.zeros(1, tcfg["latent_channels"], P, P, device=device))
    flops.update(text_encoding=text.get_total_flops(), decoding=decoder.get_total_flops())
    flops["total"] = sum(flops[k] for k in ("text_encoding", "transformer", "diffusion", "decoding"))
    return flops


def _summary(timings: List[dict], batch: int, flops: dict) -> dict:
    """Median figures of one run's timed calls (fractions of the peak: later)."""
    med = {k: statistics.median(t[k] for t in timings) for k in timings[0] if k != "transformer_scales"}
    med["transformer_scales"] = [statistics.median(s) for s in zip(*(t["transformer_scales"] for t in timings))]
    latency = med.pop("total")
    return dict(batch_size=batch, latency_s=latency, latency_s_all=[t["total"] for t in timings],
                images_per_s=batch / latency, stages_s=med,
                flops_per_image=dict(transformer=flops["transformer"], total=flops["total"]),
                achieved_flops_per_s=dict(transformer=batch * flops["transformer"] / med["transformer"],
                                          end_to_end=batch * flops["total"] / latency))


def _time_batch(clock: StageClock, runs: List[tuple], batch: int, warmup: int, iters: int) -> List[dict]:
    """Figures of each run `(options, transformer, flops)` at one batch size: `warmup` calls of each, then
    `iters` rounds of one call per run, interleaved so that a busy moment of a shared machine hits every
    run alike. Memory figures cover the batch size's calls of all runs together."""
    device, prompts = clock.device, [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    rss_before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def call(options, models):
        clock.pipe.transformer, clock.pipe.vae = models
        clock.call_options = {k: options[k] for k in ("compact_text", "prune", "bf16_cache")}
        with clock.attached():
            return clock.run(prompts)

    warmups = [[call(options, models)["total"] for _ in range(warmup)] for options, models, _ in runs]
    timings = [[] for _ in runs]
    for _ in range(iters):
        for timed, (options, models, _) in zip(timings, runs):
            timed.append(call(options, models))
    memory = dict(peak_rss_mib=_rss_mib(), rss_increase_mib=_rss_mib() - rss_before, cuda_max_allocated_mib=(
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None))
    return [dict(_summary(t, batch, f), **memory, warmup_s_all=w) for t, w, (_, _, f) in zip(timings, warmups, runs)]


def run_benchmark(config: str, dtype: str = "bf16", device: str = "cpu", batch_sizes: Sequence[int] = (1,),
                  warmup: int = 1, iters: int = 3, *, random_text_features: bool = False,
                  compile_model: Optional[bool] = None, compare: bool = False, int8: bool = False, prune: float = 1.0,
                  compact_text: bool = True, bf16_cache: bool = False) -> Dict[str, object]:
    """All figures of one configuration, dtype and device: one run per option set (`run_options`) and
    batch size (schema: module docstring). `compile_model` None: compiled with `compare`, else not."""
    from importlib.metadata import version

    if config not in CONFIG_NAMES:
        raise BenchmarkError(f"unknown configuration {config!r}; choose one of {', '.join(CONFIG_NAMES)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device is available here; use --device cpu")
    compile_model = compare if compile_model is None else compile_model
    if compile_model and warmup < 1:
        raise BenchmarkError("compiled runs need --warmup 1 or more: the first call compiles (or pass --no-compile)")
    start = time.perf_counter()
    pipe = build_pipeline(config, DTYPES[dtype], dev, random_text_features)
    build_s, build_rss = time.perf_counter() - start, _rss_mib()
    tcfg = pipe.transformer.config
    text_fn = None
    if random_text_features:
        def text_fn(prompts, device=None, *args, **kwargs):
            return random_text_conditioning(len(prompts), tcfg["context_tokens"], tcfg["context_dim"], dev)

    flops, peak = _count_flops(pipe, text_fn, dev), matmul_peak(DTYPES[dtype], dev)
    named = run_options(compare, dtype=dtype, device=dev, compile_model=compile_model, int8=int8, prune=prune,
                        compact_text=compact_text, bf16_cache=bf16_cache)
    made, plan = {}, []
    for name, options in named:
        text_tokens = flops["compacted_text_tokens"] if options["compact_text"] else None
        run_flops = dict(flops, **analytic_flops(tcfg, pipe.vae.config, text_tokens, options["prune"]))
        run_flops["total"] = sum(run_flops[k] for k in ("text_encoding", "transformer", "diffusion", "decoding"))
        try:
            plan.append((options, models_for(pipe, options, made), run_flops))
        except (ImportError, CompilerMissing) as e:  # torchao missing; no compiler for torch.compile
            raise BenchmarkError(f"--{'int8' if isinstance(e, ImportError) else 'compile'}: {e}") from None
    clock, runs, own = StageClock(pipe, dev, text_fn), [], (pipe.transformer, pipe.vae)
    for batch in batch_sizes:
        figures = _time_batch(clock, plan, batch, warmup, iters)
        for (name, options), run in zip(named, figures):
            speedup = dict(speedup=figures[0]["latency_s"] / run["latency_s"]) if compare else {}
            runs.append(dict(name=name, options=options, **speedup, **run))
    pipe.transformer, pipe.vae = own
    peak = max(peak, matmul_peak(DTYPES[dtype], dev), key=lambda p: p["flops_per_s"])
    for run in runs:
        run["fraction_of_matmul_peak"] = {k: v / peak["flops_per_s"] for k, v in run["achieved_flops_per_s"].items()}
    text_model = None if random_text_features else pipe.text_encoder
    params = {name: sum(p.numel() for p in module.parameters()) if module is not None else 0 for name, module in (
        ("transformer", pipe.transformer), ("diffusion_head", pipe.transformer.diffusion_head), ("vae", pipe.vae),
        ("text_encoder", text_model))}
    return dict(
        config=config, dtype=dtype, device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        torch_version=torch.__version__, hart_version=version("hart"), warmup=warmup, iters=iters,
        compile=compile_model, compare=compare, text_features="random" if random_text_features else "text model",
        image_size=tcfg["patch_nums"][-1] * pipe.vae.downsample_factor, patch_nums=list(tcfg["patch_nums"]),
        build_s=build_s, build_peak_rss_mib=build_rss, parameters=params, matmul_peak=peak, flops_per_image=flops, runs=runs)
