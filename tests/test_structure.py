"""The glue's shape: no import cycles, short positional argument lists, one source for defaults, and
the pipeline contract (edit pipelines take every text-to-image argument; callbacks may replace f-hat)."""
import ast
import inspect
from pathlib import Path

import pytest
import torch

from hart import limits
from hart.cli_args import SAMPLING_DEFAULTS
from hart.pipelines import HARTInpaintPipeline, HARTPipeline, HARTVariationPipeline
from hart.sampling import SamplingOptions

REPO = Path(__file__).resolve().parents[1]
# installed package name -> source folder (pyproject's package-dir)
PACKAGES = {"hart": REPO / "hart", "hart.pipelines": REPO / "pipelines", "hart.app": REPO / "app"}
MAX_POSITIONAL = 6
# Functions of modules that other work is reshaping; each must still exceed the limit (so the list
# only shrinks), and no other function may join it.
def _modules():
    """{module name: source file} for every module the package installs."""
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if package == "hart" and parts[0] in ("pipelines", "app"):
                continue
            modules[".".join([package] + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    return modules


def _imports(name: str, path: Path, modules) -> set:
    """The package's modules that `name` imports anywhere in its file (function-level imports too)."""
    def known(dotted):
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted

    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {known(a.name) for a in node.names if a.name.startswith("hart")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                module = f"{package}.{module}" if module else package
            if module.startswith("hart"):
                found |= {known(f"{module}.{a.name}") for a in node.names}
    return found - {"", name}


def test_no_module_imports_a_module_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert {"hart.cli", "hart.cli_edit", "hart.pipelines.pipeline_hart", "hart.app.__main__"} <= set(graph)

    def path_back(start):
        """An import chain from `start` back to itself, or None."""
        stack, seen = [(start, [start])], set()
        while stack:
            module, chain = stack.pop()
            for dep in graph.get(module, ()):
                if dep == start:
                    return chain + [start]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, chain + [dep]))
        return None

    cycles = [" -> ".join(chain) for chain in map(path_back, sorted(graph)) if chain]
    assert not cycles, cycles


def test_the_walk_finds_function_level_imports():
    modules = _modules()
    assert "hart.loading" in _imports("hart.cli", modules["hart.cli"], modules)  # imported inside main()


def _positional_counts():
    for root in ("hart", "pipelines"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{path.relative_to(REPO)}:{node.name}", len(node.args.posonlyargs) + len(node.args.args)


def test_no_function_takes_more_than_six_positional_parameters():
    counts = {}
    for name, n in _positional_counts():
        counts[name] = max(n, counts.get(name, 0))
    too_many = {name: n for name, n in counts.items() if n > MAX_POSITIONAL}
    assert not too_many, too_many


def test_defaults_come_from_the_one_module():
    call = inspect.signature(HARTPipeline.__call__).parameters
    options = SamplingOptions()
    # guidance: a call without one (and `hart generate` without --guidance-scale) uses the model's own
    assert call["guidance_scale"].default is None and SAMPLING_DEFAULTS["guidance_scale"] is None
    assert inspect.signature(HARTPipeline.__init__).parameters["guidance_scale"].default == options.guidance_scale \
        == limits.GUIDANCE_SCALE
    assert call["more_smooth"].default == options.more_smooth == SAMPLING_DEFAULTS["more_smooth"] == limits.MORE_SMOOTH
    assert call["stale_last_scale_guidance"].default == options.stale_last_scale_guidance
    assert call["num_maskgit_iters"].default == options.num_maskgit_iters
    literal = repr(limits.GUIDANCE_SCALE)
    for root in ("hart", "pipelines"):
        for path in (REPO / root).rglob("*.py"):
            if path.name == "limits.py" or "training" in path.parts:  # training reads its own config file
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and repr(node.value) == literal:
                    pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} writes the guidance default {literal}; "
                                "read hart.limits.GUIDANCE_SCALE")
                if isinstance(node, ast.Name) and node.id == "MAX_SEED" and path.name != "limits.py" \
                        and isinstance(getattr(node, "ctx", None), ast.Store):
                    pytest.fail(f"{path.relative_to(REPO)} defines its own MAX_SEED")


# ---- the pipeline contract -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(fixture_pipe):
    fixture_pipe.set_progress_bar_config(disable=True)
    return fixture_pipe


@pytest.fixture(scope="module")
def picture(pipe):
    side = pipe.vae.downsample_factor * pipe.transformer.patch_nums[-1]
    ramp = torch.linspace(0, 1, side)
    return torch.stack([ramp.expand(side, side), ramp.expand(side, side).T, 1 - ramp.expand(side, side)])


def _every_argument(pipe):
    """A value other than the default for every `HARTPipeline.__call__` argument but `prompt`."""
    S = len(pipe.transformer.patch_nums)
    args = dict(
        negative_prompt="blurry", num_images_per_prompt=2, guidance_scale=2.0, top_k=5, top_p=0.9,
        more_smooth=not limits.MORE_SMOOTH, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="pt", return_dict=False, callback_on_step_end=lambda p, si, side, t: {},
        callback_on_step_end_tensor_inputs=["idx"], use_system_prompt=False,
        max_sequence_length=pipe.transformer.config.context_tokens,
        stale_last_scale_guidance=not limits.STALE_LAST_SCALE_GUIDANCE, num_maskgit_iters=2, prune=0.5,
        compact_text=not SamplingOptions().compact_text, bf16_cache=not SamplingOptions().bf16_cache,
    )
    names = set(inspect.signature(HARTPipeline.__call__).parameters) - {"self", "prompt"}
    assert set(args) == names, "a new HARTPipeline.__call__ argument: add it here"
    assert S > 1
    return args


def test_edit_pipelines_take_every_text_to_image_argument(pipe, picture):
    args = _every_argument(pipe)
    fresh = lambda: dict(args, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    vary, inpaint = HARTVariationPipeline.from_pipe(pipe), HARTInpaintPipeline.from_pipe(pipe)
    for edit in (vary, inpaint):
        edit.set_progress_bar_config(disable=True)
    (plain,) = pipe("a red circle", **fresh())
    (varied,) = vary("a red circle", image=picture, keep_scales=0, **fresh())
    assert torch.equal(varied, plain)  # keep_scales=0 is text-to-image: every argument had the same effect
    mask = torch.zeros(1, *picture.shape[1:])
    mask[:, : picture.shape[1] // 2] = 1
    (inpainted,) = inpaint("a red circle", image=picture, mask_image=mask, **fresh())
    assert inpainted.shape == plain.shape == (2, 3, *picture.shape[1:])
    with pytest.raises(TypeError, match="unexpected keyword"):
        vary("a red circle", image=picture, keep_scales=0, guidance=2.0)


def _latent(pipe, callback, names=("f_hat",)):
    return pipe("a red circle", generator=torch.Generator().manual_seed(5), output_type="latent", more_smooth=False,
                callback_on_step_end=callback, callback_on_step_end_tensor_inputs=list(names)).images


def test_callback_on_step_end_may_replace_the_latent(pipe):
    pn = pipe.transformer.patch_nums
    seen = {}

    def record(p, si, side, tensors):
        seen[si] = tensors["f_hat"].clone()
        return tensors  # the tensors handed in, unchanged: the loop goes on as if nothing was returned

    baseline = _latent(pipe, record)
    baseline_seen = dict(seen)
    assert torch.equal(_latent(pipe, lambda p, si, side, t: {"f_hat": t["f_hat"].clone()}), baseline)

    last = _latent(pipe, lambda p, si, side, t: {"f_hat": torch.zeros_like(t["f_hat"])} if si == len(pn) - 1 else {})
    assert torch.equal(last, torch.zeros_like(baseline))  # the replacement is the result

    def zero_at_scale_1(p, si, side, tensors):
        seen[si] = (tensors["f_hat"].clone(), tensors["idx"])
        return {"f_hat": torch.zeros_like(tensors["f_hat"])} if si == 1 else {}

    seen.clear()
    _latent(pipe, zero_at_scale_1, ("f_hat", "idx"))
    assert torch.equal(seen[1][0], baseline_seen[1])
    # scale 2 continues from the zeroed latent: its f-hat holds scale 2's own codes and nothing else
    f_hat_2, idx_2 = seen[2]
    expected, _ = pipe.vae.quantize.next_scale_input(2, pn, torch.zeros_like(f_hat_2), pipe.vae.quantize.embed(idx_2))
    torch.testing.assert_close(f_hat_2, expected)
    assert not torch.allclose(f_hat_2, baseline_seen[2])


def test_callback_on_step_end_replacements_are_checked(pipe):
    with pytest.raises(ValueError, match="shape"):
        _latent(pipe, lambda p, si, side, t: {"f_hat": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="only"):
        _latent(pipe, lambda p, si, side, t: {"idx": torch.zeros(1, side * side, dtype=torch.long)}, ("idx",))


def test_help_imports_no_heavy_module():
    """`hart --help` (and each command's) answers at once: torch, diffusers and transformers load
    only when a command runs."""
    import subprocess
    import sys

    code = ("import sys; from hart.cli import main\n"
            "for command in ([], ['generate'], ['inpaint'], ['vary'], ['convert'], ['benchmark'], ['app']):\n"
            "    main(command + ['--help'])\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_model_cpu_offload_runs_the_edit_pipelines_through_public_hooks(pipe, picture):
    import copy

    for root in ("hart", "pipelines"):
        for path in (REPO / root).rglob("*.py"):
            assert "_hf_hook" not in path.read_text(), f"{path.relative_to(REPO)} reaches into accelerate's hook"
    mask = torch.zeros(1, *picture.shape[1:])
    mask[:, :, : picture.shape[2] // 2] = 1
    run = lambda p: p("a red circle", image=picture, mask_image=mask, blend_radius=2, output_type="pt",
                      generator=torch.Generator().manual_seed(9)).images
    inpaint = HARTInpaintPipeline.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    offloaded = HARTInpaintPipeline.from_pipe(copy.deepcopy(pipe))
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload(device="cpu")  # the same hooks a GPU run installs
    assert torch.equal(run(offloaded), run(inpaint))
