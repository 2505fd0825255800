"""`hart benchmark`: the tiny configuration end to end on CPU, the FLOP counts, bad input."""
import json

import PIL.Image
import pytest
import torch

from hart import benchmark as bench
from hart import benchmark_runs, device
from hart.device import auto_dtype
from hart.cli import main
from hart.pruning import DEFAULT_KEEP
from hart.sampling import sample_scales
from tests.utils import strict_recompiles


def test_tiny_benchmark_writes_every_documented_field(tmp_path, capsys, monkeypatch):
    from hart.models.attention import KVCache

    cache_dtypes, init = set(), KVCache.__init__
    monkeypatch.setattr(KVCache, "__init__", lambda self, *a: cache_dtypes.add(a[-1]) or init(self, *a))
    assert main(["benchmark", "--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch-size", "1",
                 "--batch-size", "2", "--warmup", "0", "--iters", "1", "--bf16-cache", "--out", str(tmp_path)]) == 0
    assert cache_dtypes == {torch.bfloat16}  # the option reached every call
    result = json.loads((tmp_path / "benchmark.json").read_text())
    for key in ("config", "dtype", "device", "device_name", "torch_version", "hart_version", "warmup", "iters",
                "compile", "text_features", "image_size", "patch_nums", "build_s", "build_peak_rss_mib", "parameters", "matmul_peak",
                "flops_per_image", "runs"):
        assert key in result, key
    flops = result["flops_per_image"]
    assert all(flops[k] > 0 for k in ("text_encoding", "transformer", "diffusion", "decoding"))
    assert flops["total"] == flops["text_encoding"] + flops["transformer"] + flops["diffusion"] + flops["decoding"]
    assert len(flops["transformer_scales"]) == len(result["patch_nums"]) == 4
    assert result["matmul_peak"]["flops_per_s"] > 0
    assert [run["batch_size"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        stages = run["stages_s"]
        assert len(stages["transformer_scales"]) == 4 and all(t > 0 for t in stages["transformer_scales"])
        assert stages["transformer"] == pytest.approx(sum(stages["transformer_scales"]))
        total = sum(stages[k] for k in ("text_encoding", "transformer", "diffusion", "decoding", "other"))
        assert total == pytest.approx(run["latency_s"])
        assert run["images_per_s"] == pytest.approx(run["batch_size"] / run["latency_s"])
        assert run["peak_rss_mib"] >= result["build_peak_rss_mib"] > 0 and run["rss_increase_mib"] >= 0 and run["cuda_max_allocated_mib"] is None
        assert set(run["fraction_of_matmul_peak"]) == set(run["achieved_flops_per_s"]) == {"transformer", "end_to_end"}
        assert run["options"]["bf16_cache"] is True
    with PIL.Image.open(tmp_path / "benchmark.png") as chart:
        chart.verify()
    assert "batch 2:" in capsys.readouterr().out


def test_the_better_of_two_peak_measurements_is_the_reference(monkeypatch):
    """The peak is measured before and after the timed calls; a low first reading (a busy moment on a
    shared machine) must not inflate the fractions."""
    readings = iter([dict(size=512, seconds=1.0, flops_per_s=1e9), dict(size=1024, seconds=1.0, flops_per_s=4e9)])
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device: next(readings))
    result = bench.run_benchmark("tiny", "fp32", "cpu", (1,), warmup=0, iters=1)
    assert result["matmul_peak"]["flops_per_s"] == 4e9
    run = result["runs"][0]
    assert run["fraction_of_matmul_peak"]["transformer"] == pytest.approx(run["achieved_flops_per_s"]["transformer"] / 4e9)


def test_flop_counter_matches_hand_computation():
    linear, conv = torch.nn.Linear(5, 7), torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)
    with bench.flop_counter() as counter:
        linear(torch.randn(6, 5))
    assert counter.get_total_flops() == 2 * 6 * 5 * 7
    with bench.flop_counter() as counter:
        conv(torch.randn(2, 3, 8, 8))
    assert counter.get_total_flops() == 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8)
    with bench.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
    assert counter.get_total_flops() == 4 * 2 * 3 * 10 * 12 * 8


def test_analytic_flops_equal_the_counted_sampling():
    pipe = bench.build_pipeline("tiny", torch.float32, torch.device("cpu"), random_text_features=True)
    tcfg = dict(pipe.transformer.config)
    cond = bench.random_text_conditioning(1, tcfg["context_tokens"], tcfg["context_dim"], "cpu")
    with torch.no_grad(), bench.flop_counter() as counter:
        sample_scales(pipe.transformer, pipe.vae.quantize, cond, more_smooth=True, compact_text=False,
                      generator=torch.Generator().manual_seed(0))
    flops = bench.analytic_flops(tcfg, dict(pipe.vae.config))
    assert counter.get_total_flops() == flops["transformer"] + flops["diffusion"]


def test_analytic_flops_follow_text_compaction_and_pruning():
    pipe = bench.build_pipeline("tiny", torch.float32, torch.device("cpu"), random_text_features=True)
    tcfg = dict(pipe.transformer.config)
    cond = bench.random_text_conditioning(1, tcfg["context_tokens"], tcfg["context_dim"], "cpu")
    with torch.no_grad(), bench.flop_counter() as counter:
        sample_scales(pipe.transformer, pipe.vae.quantize, cond, more_smooth=True, compact_text=True, prune=0.25,
                      generator=torch.Generator().manual_seed(0))
    # the random features repeat one padding feature, as a text model does: the real tokens plus one key
    flops = bench.analytic_flops(tcfg, dict(pipe.vae.config), text_tokens=bench.RANDOM_TEXT_TOKENS + 1, keep=0.25)
    assert counter.get_total_flops() == flops["transformer"] + flops["diffusion"]
    assert flops["transformer"] < bench.analytic_flops(tcfg, dict(pipe.vae.config))["transformer"]


def test_compare_times_plain_exact_and_fast_in_one_run(tmp_path, capsys):
    assert main(["benchmark", "--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--compare", "--no-compile",
                 "--warmup", "0", "--iters", "1", "--random-text-features", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["compare"] is True
    runs = {run["name"]: run for run in result["runs"]}
    assert list(runs) == ["plain", "exact", "fast"]
    plain, exact, fast = runs["plain"]["options"], runs["exact"]["options"], runs["fast"]["options"]
    assert plain == dict(compact_text=False, prune=1.0, int8=False, compile=False, bf16_head_decoder=False,
                         bf16_cache=False)
    assert exact == dict(plain, compact_text=True, bf16_head_decoder=auto_dtype("cpu").name == "bf16")
    assert fast["bf16_head_decoder"] == exact["bf16_head_decoder"]
    assert fast["compact_text"] and fast["prune"] == DEFAULT_KEEP and not fast["bf16_cache"]
    assert runs["plain"]["speedup"] == 1.0
    for run in runs.values():
        assert run["speedup"] == pytest.approx(runs["plain"]["latency_s"] / run["latency_s"])
        assert set(run["stages_s"]) >= {"text_encoding", "transformer", "diffusion", "decoding", "other"}
        assert 0 < run["fraction_of_matmul_peak"]["transformer"]
    # each run's share of the peak counts the work it does: fewer text keys, fewer tokens
    assert runs["plain"]["flops_per_image"]["transformer"] > runs["exact"]["flops_per_image"]["transformer"] \
        > runs["fast"]["flops_per_image"]["transformer"]
    out = capsys.readouterr().out
    assert "exact (" in out and "x plain" in out


def test_compare_compiles_exact_and_fast_after_a_warm_up_call(tmp_path, capsys):
    """`--compare` compiles the exact and fast runs (the issue's exact option set includes compilation); the
    warm-up call that compiles is reported on its own, and no warm-up at all is refused."""
    args = ["benchmark", "--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--compare", "--iters", "1",
            "--random-text-features", "--out", str(tmp_path)]
    assert main([*args, "--warmup", "0"]) == 2
    assert "compiled runs need --warmup 1 or more" in capsys.readouterr().err
    with strict_recompiles(4):
        assert main([*args, "--warmup", "1"]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    runs = {run["name"]: run for run in result["runs"]}
    assert result["compile"] is True
    assert [runs[n]["options"]["compile"] for n in ("plain", "exact", "fast")] == [False, True, True]
    assert all(len(run["warmup_s_all"]) == 1 for run in runs.values())
    out = capsys.readouterr().out
    assert out.count("(first call, compiling: ") == 2


def test_bad_configuration_is_a_clear_error(tmp_path, capsys):
    assert main(["benchmark", "--config", "nope", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "unknown configuration 'nope'; choose one of hart-0.7b-1024" in capsys.readouterr().err


def test_bundled_configuration_names_a_missing_model(tmp_path, capsys, monkeypatch):
    import hart.bundled

    monkeypatch.setattr(hart.bundled, "BUNDLED_MODEL", str(tmp_path / "shapes-128"))
    assert main(["benchmark", "--config", "bundled", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "the bundled model is missing from this install" in capsys.readouterr().err

NO_BF16 = {"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize("caps, dtype, bf16", [
    (dict(NO_BF16, avx512_bf16=True), "fp32", True),  # exact runs the head and decoder in bf16
    (NO_BF16, "fp32", False),  # no native bf16: they stay fp32
    (dict(NO_BF16, avx512_bf16=True), "bf16", False),  # already bf16
])
def test_exact_puts_head_and_decoder_in_bf16_only_on_bf16_cpus(monkeypatch, caps, dtype, bf16):
    monkeypatch.setattr(device, "cpu_capabilities", lambda: caps)
    runs = dict(benchmark_runs.run_options(True, dtype=dtype, device=torch.device("cpu"), compile_model=False,
                                           int8=False, prune=1.0, compact_text=True))
    assert not runs["plain"]["bf16_head_decoder"]
    assert runs["exact"]["bf16_head_decoder"] == runs["fast"]["bf16_head_decoder"] == bf16
    assert device.head_and_decoder_dtype(bench.DTYPES[dtype]) == (torch.bfloat16 if bf16 else bench.DTYPES[dtype])


def test_bf16_head_and_decoder_copies_change_the_image_by_rounding_only():
    pipe = bench.build_pipeline("tiny", torch.float32, torch.device("cpu"), random_text_features=True)
    made = {}
    plain = benchmark_runs.models_for(pipe, dict(int8=False, compile=False, bf16_head_decoder=False), made)
    exact = benchmark_runs.models_for(pipe, dict(int8=False, compile=False, bf16_head_decoder=True), made)
    assert plain == (pipe.transformer, pipe.vae)
    transformer, vae = exact
    assert {p.dtype for p in transformer.diffusion_head.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in (*vae.decoder.parameters(), *vae.post_quant_conv.parameters())} == {torch.bfloat16}
    assert {p.dtype for p in (*transformer.blocks.parameters(), *vae.quantize.parameters(), *vae.encoder.parameters(),
                              *pipe.transformer.diffusion_head.parameters(), *pipe.vae.decoder.parameters())} \
        == {torch.float32}
    t = transformer.config
    cond = bench.random_text_conditioning(1, t.context_tokens, t.context_dim, "cpu")
    images = []
    for models in (plain, exact):
        pipe.transformer, pipe.vae = models
        pipe.encode_prompt = lambda prompts, *a, **k: cond
        images.append(pipe("x", generator=torch.Generator().manual_seed(0), output_type="pt").images)
        del pipe.encode_prompt
    assert images[1].dtype == torch.float32
    difference = (images[0] - images[1]).abs()
    assert 0 < difference.max() < 0.1 and difference.mean() < 0.01
