"""Fuzzing the `hart generate|inpaint|outpaint|vary` command lines: random strings, numbers and paths for
every flag must end in exit status 0, or status 2 with one error line, never a traceback.

Everything up to the images runs as it does for a user (parsing, every check, device choice, model
layout detection, output folder checks, saving); the heavy parts are replaced: the model is a private
copy of the fixture pipeline, and generation returns blank images of the model's size. A refused run
must leave its output folder uncreated (and nothing in the working folder, a fresh one each time).
"""
import copy
import io
import itertools
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hart.cli import build_parser, main
from hart.cli_args import PATH
from hart.pipelines import HARTPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE = 64  # the fixture model's image size
COMMANDS = ("generate", "inpaint", "outpaint", "vary")
EDGE_NUMBERS = ["0", "1", "2", "3", "0.5", "-1", "nan", "inf", "-inf", "1e9", "255", "256", "16385", str(2**53),
                str(2**63), "1e400"]


@pytest.fixture(scope="module")
def fake_generation(fixture_pipe):
    """Real loading checks, the fixture model (a private copy: dtypes may change), blank images."""
    from hart import loading
    from hart import cli as hart_cli
    from hart.pipelines.pipeline_hart_edit import _EditPipeline

    model = copy.deepcopy(fixture_pipe)

    def from_folder(cls, path, text_encoder=None, use_ema=True, torch_dtype=None):
        loading.detect_layout(path)
        if text_encoder is not None:
            loading.resolve_folder(text_encoder)
        return model

    def blank(n):
        return [Image.new("RGB", (SIDE, SIDE)) for _ in range(n)]

    def generate_batch(pipe, batch, settings, save_steps):
        previews = [torch.zeros(len(batch), 3, 4, 4)] * 2 if save_steps else []
        return blank(len(batch)), previews

    def run(self, prompt, edit, kwargs):
        from diffusers import ImagePipelineOutput

        return ImagePipelineOutput(images=blank(1))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HARTPipeline, "from_folder", classmethod(from_folder))
        mp.setattr(hart_cli, "generate_batch", generate_batch)
        mp.setattr(_EditPipeline, "_run", run)
        yield


@pytest.fixture(scope="module")
def world(fixtures, fixture_pipe, tmp_path_factory):
    """Paths a user might give: models in every layout, images, masks, prompt files, folders, odd names. All of
    them lie under a temporary folder: a drawn `--out` may name any of them, and a run writes its images there."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    pipeline = root / "pipeline"
    fixture_pipe.save_pretrained(pipeline)
    run = root / "runs" / "x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    shutil.copytree(pipeline, run / "pipeline")
    Image.new("RGB", (SIDE, SIDE), "grey").save(root / "photo.png")
    Image.new("RGB", (SIDE + 16, SIDE), "grey").save(root / "wide.png")
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    (root / "prompts.txt").write_text("a cat\na dog\n")
    (root / "prompts.jsonl").write_text('{"prompt": "a cat"}\n{"text": "no prompt"}\n')
    (root / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (root / "file.txt").write_text("x")
    ckpt = root / "official"  # a copy: the repository's fixture folder must never become an --out
    shutil.copytree(fixtures / "ckpt", ckpt)
    paths = [ckpt, ckpt / "text_encoder", pipeline, run, root / "photo.png", root / "wide.png", root / "mask.png",
             root / "prompts.txt", root / "prompts.jsonl", root / "latin1.txt", root / "file.txt", root,
             root / "missing" / "deeper", root / "file.txt" / "below", root / ("n" * 300)]
    return dict(root=root, pipeline=pipeline, ckpt=ckpt, paths=[str(p) for p in paths])


def _value(paths):
    numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from(EDGE_NUMBERS + ["", " ", "cpu", "cuda", "fp16", "bf16"]))
    return st.one_of(numbers.map(str), st.text(max_size=20), st.sampled_from(paths),
                     st.text(max_size=300).map(lambda t: "d/" + t))


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "yes")]


def _subparser(command):
    return build_parser()._subparsers._group_actions[0].choices[command]


def _command_lines(command, base, paths):
    """The command, a prompt (sometimes random or missing), a valid base with pairs left out at random, and up
    to four flags with random values (half of the time of the flag's kind: a choice, a path, an edge number)."""
    def arg(action):
        fitting = action.choices or (paths if action.type is PATH else EDGE_NUMBERS)
        value = st.one_of(_value(paths), st.sampled_from(list(fitting)))
        count = 0 if action.nargs == 0 else (action.nargs if isinstance(action.nargs, int) else 1)
        return st.tuples(st.sampled_from(action.option_strings), st.lists(value, min_size=count, max_size=count)).map(
            lambda fv: [fv[0], *fv[1]])

    prompt = st.sampled_from([["a red fox"]] * 4 + [[]]) | st.text(max_size=30).map(lambda t: [t])
    pairs = range(0, len(base), 2)
    kept = st.sampled_from([set(pairs)] * 3) | st.sets(st.sampled_from(pairs))
    extra = st.lists(st.sampled_from(_flags(_subparser(command))).flatmap(arg), max_size=4)
    return st.tuples(prompt, kept, extra).map(
        lambda pke: [command, *pke[0]] + [x for i in sorted(pke[1]) for x in base[i:i + 2]]
        + [x for a in pke[2] for x in a])


_runs = itertools.count()


def _fuzz(command, world, data):
    from accelerate.state import PartialState

    root = world["root"]
    out = root / f"out-{next(_runs)}"
    base = ["--model", str(world["pipeline"]), "--out", str(out)]
    if command != "generate":
        base += ["--image", str(root / "photo.png")]
    if command == "inpaint":
        base += ["--mask", str(root / "mask.png")]
    if command == "outpaint":
        base += ["--image-size", "32"]
    if command == "vary":
        base += ["--keep-scales", "2"]  # the default 4 is the release's; the fixture model has 4 scales
    argv = data.draw(_command_lines(command, base, world["paths"]))
    cwd = root / f"cwd-{next(_runs)}"  # relative --out values and the default output folders land here
    cwd.mkdir()
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()), pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            status = main(argv)
    finally:
        PartialState._reset_state()
    lines = [line for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert status in (0, 2), (argv, status, lines)
    if status == 2:
        assert len(lines) == 1 and "Traceback" not in lines[0] and "error:" in lines[0], (argv, lines)
        assert not out.exists() and not any(cwd.iterdir()), argv  # a refused run leaves nothing behind
    else:
        assert not lines, (argv, lines)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cwd)


@pytest.mark.parametrize("command", COMMANDS)
def test_fuzz_command_line(command, world, fake_generation):
    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def check(data):
        _fuzz(command, world, data)

    check()
