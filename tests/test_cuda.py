"""Reduced-precision and CUDA paths, against the reference recording.

The recorded default generation is replayed (its tokens and diffusion output imposed) with the
models on a device in a dtype, and every scale's guided logits, f-hat and the images are compared
with the reference's fp32 numbers. The CPU bf16 case runs everywhere; the CUDA cases are marked
`cuda` (`scripts/gpu_check.sh` runs them) and skipped where torch sees no GPU. The last test runs the
GPU script itself, which falls back to the CPU here.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from hart.loading import load_official_tokenizer, load_official_transformer
from hart.sampling import ForcedTokens, sample_scales
from hart.text import TextConditioning
from tests.utils import REPO_ROOT, assert_close

NO_CUDA = "needs a CUDA device: on a GPU machine run scripts/gpu_check.sh (or python -m pytest -m cuda)"
ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
# (device, dtype, tolerance on logits and f-hat as a fraction of the reference's largest magnitude, on images
# in [0, 1]). bf16 keeps 8 bits of mantissa: on CPU its logits land within 1.2-1.9% of the largest logit
# (0.6 of 34) and its images within 0.04. fp32 on CUDA differs by the TF32 convolutions of the decoder.
CASES = [
    pytest.param("cpu", torch.bfloat16, 0.03, 0.08, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, 1e-4, 0.01, id="cuda-fp32", marks=ON_CUDA),
    pytest.param("cuda", torch.bfloat16, 0.03, 0.08, id="cuda-bf16", marks=ON_CUDA),
    pytest.param("cuda", torch.float16, 0.01, 0.03, id="cuda-fp16", marks=ON_CUDA),
]


@pytest.fixture(scope="module")
def models(fixtures):
    return load_official_transformer(fixtures / "ckpt" / "llm"), load_official_tokenizer(fixtures / "ckpt" / "tokenizer")


@pytest.mark.parametrize("device, dtype, rel, image_atol", CASES)
def test_replayed_generation_stays_close_to_the_reference(models, recorded, device, dtype, rel, image_atol):
    rec, inputs = recorded("generation/default"), recorded("generation/inputs")
    call = rec.meta["call"]
    assert not call["more_smooth"]  # hard codes: the recorded tokens can be imposed
    transformer, vae = (copy.deepcopy(m).to(device, dtype) for m in models)
    S, B = len(transformer.patch_nums), call["B"]
    P2, Cv = transformer.patch_nums[-1] ** 2, vae.config.latent_channels
    cond = TextConditioning(*(inputs[k][:B].to(device) for k in ("label_B", "context_mask", "context_position_ids")))
    logits = {}

    def keep(si, guided_BlV):
        logits[si] = guided_BlV
        return guided_BlV
    forced = ForcedTokens(idx=[rec[f"idx_stage{si}"].to(device) for si in range(S)],
                          residual_BLCv=rec["diff_out_0"][: B * P2].view(B, P2, Cv).to(device), logits_processor=keep)

    with torch.no_grad():
        f_hat = sample_scales(transformer, vae.quantize, cond, guidance_scale=call["cfg"], forced=forced,
                              top_k=[c["top_k"] for c in rec.meta["stage_sampler_calls"]], top_p=call["top_p"],
                              generator=torch.Generator().manual_seed(call["g_seed"]), more_smooth=False)
        images = (vae.decode_latent(f_hat.to(dtype)).float() + 1) / 2
    for si in range(S):
        expected = rec[f"logits_stage{si}"]
        assert logits[si].dtype == torch.float32 and logits[si].device.type == device
        assert_close(logits[si], expected, rel * expected.abs().max().item(), f"logits_stage{si}")
    assert_close(f_hat, rec["f_hat"], rel * rec["f_hat"].abs().max().item(), "f_hat")
    assert_close(images, rec["images"], image_atol, "images")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_xformers_attention_matches_sdpa():
    pytest.importorskip("xformers")
    from hart.models.attention import attention

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 64, generator=g, device="cuda", dtype=torch.float16) for _ in range(3))
    ours = attention(q, k, v, scale=0.125)  # no mask, fp16 on CUDA: the xformers kernel
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.125)
    assert_close(ours.float(), expected, 2e-3, "attention")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_pipeline_generates_on_cuda_in_bf16(fixture_pipe):
    pipe = copy.deepcopy(fixture_pipe).to("cuda", torch.bfloat16)
    run = lambda: pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type="pt").images
    first, second = run(), run()
    assert first.shape[0] == 1 and torch.isfinite(first.float()).all()
    assert torch.equal(first, second)


def test_gpu_check_script_falls_back_to_the_cpu(tmp_path):
    """Without a GPU the script says so, runs its steps on the CPU (the tiny configuration) and writes
    the benchmark's JSON, so the script itself is exercised on every machine."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout and "not GPU figures" in proc.stdout
    result = json.loads((out / "benchmark.json").read_text())
    assert result["config"] == "tiny" and result["device"] == "cpu"
    assert sorted((r["name"], r["batch_size"]) for r in result["runs"]) == [
        (name, b) for name in ("exact", "fast", "plain") for b in (1, 8)]  # --compare: compiled, pruned
