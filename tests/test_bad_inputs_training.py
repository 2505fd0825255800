"""The bad-input catalogue of training and model loading (`scripts/finetune.py`, `scripts/train_tokenizer.py`,
`hart.loading`): every way a user can get an input wrong there, one case each.

A command-line case runs the program's entry point in-process and asserts exit status 2, exactly one
error line (no traceback), the words that name the problem, and that every file that existed before
is byte-identical afterwards with nothing added (a refused run leaves nothing behind). A loader case
asserts `CheckpointError` with a one-line message naming the file. `docs/troubleshooting.md` lists
these errors. The command-line fuzz tests are at the end.
"""
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hart.loading import CheckpointError, detect_layout, load_image_tokenizer
from hart.pipelines import HARTPipeline
from hart import cli_args
from hart.training import checks
from hart.training.checks import SettingError
from hart.training.cli import (CHECKERS, finetune_config, finetune_main, finetune_parser, run_program, tokenizer_config,
                               tokenizer_main, tokenizer_parser)
from tests.test_training_data import make_folder
from tests.utils import REPO_ROOT, fixture_root, fixture_sizes

SIDE = fixture_sizes().image_size  # the fixture model's image side; training images must be at least that
LLM = json.loads((fixture_root() / "ckpt" / "llm" / "config.json").read_text())  # its transformer's sizes
WIDTH, DEPTH = LLM["embed_dim"], LLM["depth"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- what every case checks ------------------------------------------------------------------------

def snapshot(root: Path) -> dict:
    """Every file and folder under `root` -> a hash of its bytes (None for folders)."""
    return {str(p.relative_to(root)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def is_progress_bar(line: str) -> bool:
    return "%|" in line  # tqdm's bars (training, loading): not error output


class Runner:
    """Runs a training entry point in-process and collects its error output."""

    def __init__(self, capsys, caplog):
        self.capsys, self.caplog = capsys, caplog

    def __call__(self, main, argv) -> tuple:
        self.capsys.readouterr()
        self.caplog.clear()
        with self.caplog.at_level(logging.ERROR):
            status = main([str(a) for a in argv])
        logged = [r.getMessage() for r in self.caplog.records if r.levelno >= logging.ERROR]
        printed = [line for line in self.capsys.readouterr().err.replace("\r", "\n").splitlines()
                   if line.strip() and not is_progress_bar(line)]
        return status, logged + printed


@pytest.fixture
def run(capsys, caplog):
    return Runner(capsys, caplog)


def assert_refused(result: tuple, *parts: str) -> str:
    status, lines = result
    assert status == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def assert_one_line_error(exc_info, *parts: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


# ---- shared inputs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(fixtures, tmp_path_factory):
    """Read-only inputs: data, the official fixture model, the same model in this package's layout,
    and one finished fine-tuning run (1 step, with its checkpoint and exported pipeline)."""
    from hart import HARTPipeline
    from hart.training.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("world")
    data = make_folder(root / "data", n=4, size=(SIDE + 8, SIDE + 16))
    official, text_encoder = fixtures / "ckpt", fixtures / "ckpt" / "text_encoder"
    HARTPipeline.from_official(official, text_encoder=text_encoder).save_pretrained(root / "pipeline")
    finetune(FinetuneConfig(pretrained=str(official), text_encoder=str(text_encoder), data_dir=str(data),
                            output_dir=str(root / "run"), batch_size=2, max_steps=1, checkpoint_every=1, ema_decay=0.0))
    return dict(root=root, data=data, official=official, text_encoder=text_encoder, pipeline=root / "pipeline",
                run=root / "run")


@pytest.fixture
def ws(world, tmp_path):
    """A writable workspace: copies of the inputs a case may change live here."""
    class Workspace:
        tmp = tmp_path
        data, official, text_encoder = world["data"], world["official"], world["text_encoder"]

        @staticmethod
        def copy(name: str) -> Path:
            shutil.copytree(world[name], tmp_path / name)
            return tmp_path / name

        def finetune_argv(self, *extra, out=None):
            return ["--pretrained", self.official, "--text_encoder", self.text_encoder, "--data_dir", self.data,
                    "--output_dir", out or tmp_path / "out", "--batch_size", 2, "--ema_decay", 0, *extra]

        def tokenizer_argv(self, *extra, out=None):
            return ["--pretrained", self.official, "--data_dir", self.data, "--output_dir", out or tmp_path / "out",
                    "--batch_size", 2, *extra]

    return Workspace()


def refused_run(run, main, argv, root: Path, *parts: str) -> str:
    """`main(argv)` is refused with one line naming `parts`, and nothing under `root` changes."""
    before = snapshot(root)
    line = assert_refused(run(main, argv), *parts)
    assert snapshot(root) == before
    return line


# ---- every value is checked when parsed (nothing is loaded, nothing written) ---------------------

FINETUNE_VALUES = [
    (["--batch_size", "0"], "--batch_size", "a positive integer", "'0'"),
    (["--batch_size", "2.5"], "--batch_size", "a positive integer"),
    (["--lr", "nan"], "--lr", "finite number > 0"),
    (["--lr", "inf"], "--lr", "finite number > 0"),
    (["--lr", "-0.001"], "--lr", "> 0"),
    (["--lora_rank", "-4"], "--lora_rank", ">= 0"),
    (["--max_steps", "0"], "--max_steps", "a positive integer"),
    (["--grad_accum", "0"], "--grad_accum", "a positive integer"),
    (["--weight_decay", "-0.1"], "--weight_decay", ">= 0"),
    (["--warmup_steps", "-1"], "--warmup_steps", ">= 0"),
    (["--min_lr_ratio", "1.5"], "--min_lr_ratio", "from 0 to 1"),
    (["--max_grad_norm", "nan"], "--max_grad_norm", "finite"),
    (["--cond_drop_rate", "2"], "--cond_drop_rate", "from 0 to 1"),
    (["--ema_decay", "1"], "--ema_decay", "not including, 1"),
    (["--seed", "-1"], "--seed", "from 0 to 4294967295"),
    (["--seed", str(2**63 - 1)], "--seed", "from 0 to 4294967295"),
    (["--checkpoint_every", "0"], "--checkpoint_every", "a positive integer"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints", "a positive integer"),
    (["--validation_every", "-5"], "--validation_every", ">= 0"),
    (["--validation_guidance", "1e9"], "--validation_guidance", "from 0 to 1000"),
    (["--validation_prompt", "  "], "--validation_prompt", "non-empty text"),
    (["--num_workers", "-1"], "--num_workers", ">= 0"),
    (["--min_image_size", "0"], "--min_image_size", "a positive integer"),
    (["--crop", "diagonal"], "--crop", "invalid choice"),
    (["--learning_rate", "1e-4"], "unrecognized arguments", "--learning_rate"),
    (["--lora_rank", "0", "--lora_alpha", "8"], "--lora_alpha", "--lora_rank"),
    (["--lora_rank", "4", "--lora_targets", "everything"], "--lora_targets", "one of"),
    (["--cache_only"], "--cache_only needs --cache_dir"),
    (["--resume", "latest", "--overwrite"], "--overwrite", "--resume", "only one"),
    (["--output_dir", "x" * 300], "--output_dir", "at most 255 bytes"),
    (["--prior_ratio", "1"], "--prior_ratio", "not including, 1"),
    (["--prior_ratio", "-0.5"], "--prior_ratio", "from 0 up to"),
    (["--prior_ratio", "nan"], "--prior_ratio", "from 0 up to"),
    (["--prior_images", "0"], "--prior_images", "a positive integer"),
    (["--prior_ratio", "0", "--prior_prompts", "prompts.txt"], "--prior_prompts", "--prior_ratio 0 turns off"),
    (["--validation_world_prompts", "257"], "--validation_world_prompts", "from 0 to 256"),
    (["--validation_world_prompts", "-1"], "--validation_world_prompts", "from 0 to 256"),
]


@pytest.mark.parametrize("extra,parts", [(c[0], c[1:]) for c in FINETUNE_VALUES],
                         ids=[" ".join(c[0])[:40] for c in FINETUNE_VALUES])
def test_finetune_value_is_refused(run, ws, extra, parts):
    refused_run(run, finetune_main, ws.finetune_argv(*extra), ws.tmp, *parts)
    assert not (ws.tmp / "out").exists()


def without(argv: list, flag: str) -> list:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def test_finetune_without_output_dir_or_data(run, ws):
    refused_run(run, finetune_main, without(ws.finetune_argv(), "--output_dir"), ws.tmp, "--output_dir", "required")
    refused_run(run, finetune_main, without(ws.finetune_argv(), "--data_dir"), ws.tmp, "--data_dir", "--cache_dir")


TOKENIZER_VALUES = [
    (["--batch_size", "0"], "--batch_size", "a positive integer"),
    (["--lr", "nan"], "--lr", "finite"),
    (["--skip_continuous_prob", "2"], "--skip_continuous_prob", "from 0 to 1"),
    (["--disc_weight", "-1"], "--disc_weight", ">= 0"),
    (["--restart_dead_codes_every", "-1"], "--restart_dead_codes_every", ">= 0"),
    (["--recon_weight", "inf"], "--recon_weight", "finite"),
    (["--max_steps", "0"], "--max_steps", "a positive integer"),
    (["--trainable", "encoder"], "--trainable", "invalid choice"),
    (["--model_config", "tok.json"], "--model_config", "not allowed with argument --pretrained"),
]


@pytest.mark.parametrize("extra,parts", [(c[0], c[1:]) for c in TOKENIZER_VALUES],
                         ids=[" ".join(c[0])[:40] for c in TOKENIZER_VALUES])
def test_tokenizer_value_is_refused(run, ws, extra, parts):
    refused_run(run, tokenizer_main, ws.tokenizer_argv(*extra), ws.tmp, *parts)
    assert not (ws.tmp / "out").exists()


MODEL_CONFIGS = [
    (None, "no such file"),
    (b"{not json", "is not a JSON file"),
    (b"\xff\xfe{}", "is not a JSON file"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"vocab_size": 64, "wings": 2}).encode(), "does not describe a HybridTokenizer", "wings"),
    (json.dumps({"vocab_size": -5}).encode(), "does not describe a HybridTokenizer"),
]


@pytest.mark.parametrize("content,parts", [(c[0], c[1:]) for c in MODEL_CONFIGS],
                         ids=["missing", "not-json", "not-utf8", "list", "unknown-key", "negative-size"])
def test_tokenizer_model_config_is_refused(run, ws, content, parts):
    path = ws.tmp / "tok.json"
    if content is not None:
        path.write_bytes(content)
    argv = ["--model_config", path, *ws.tokenizer_argv()[2:]]
    refused_run(run, tokenizer_main, argv, ws.tmp, "--model_config", str(path), *parts)


def test_help_lists_the_prior_and_world_flags(capsys):
    assert finetune_main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--prior_ratio", "--prior_images", "--prior_prompts", "--validation_world_prompts"):
        assert flag in text, flag


def test_every_flag_that_takes_a_value_is_checked():
    for parser in (finetune_parser(), tokenizer_parser()):
        for action in _flags(parser):
            if action.nargs != 0:
                assert action.choices or action.type in CHECKERS.values(), action.option_strings


def test_settings_from_python_are_checked_the_same_way(ws):
    from hart.training.config import FinetuneConfig, TokenizerTrainConfig

    base = dict(pretrained=str(ws.official), output_dir=str(ws.tmp / "o"), data_dir=str(ws.data))
    for field, value, part in [("batch_size", 0, "--batch_size"), ("lr", float("nan"), "--lr"),
                               ("batch_size", True, "--batch_size"), ("max_steps", 2.0, "--max_steps"),
                               ("validation_prompts", ("ok", ""), "--validation_prompt"),
                               ("mixed_precision", "fp8", "--mixed_precision")]:
        with pytest.raises(SettingError) as e:
            FinetuneConfig(**base, **{field: value})
        assert_one_line_error(e, part)
    with pytest.raises(SettingError) as e:
        TokenizerTrainConfig(data_dir=str(ws.data), output_dir=str(ws.tmp / "o"))
    assert_one_line_error(e, "--pretrained", "--model_config")


# ---- output folders: never overwrite an earlier run, write only where it can ---------------------

def test_output_dir_holding_an_earlier_run_is_refused(run, ws):
    out = ws.copy("run")
    refused_run(run, finetune_main, ws.finetune_argv(out=out), ws.tmp, str(out), "holds an earlier run",
                "--resume latest", "--overwrite", "run.old-1")


def test_output_dir_holding_an_unfinished_run_points_at_overwrite(run, ws):
    out = ws.tmp / "out"
    (out / "logs").mkdir(parents=True)
    (out / "run_info.json").write_text("{}")  # a run killed before its first checkpoint
    refused_run(run, finetune_main, ws.finetune_argv(), ws.tmp, "no finished checkpoint", "--overwrite")


def test_tokenizer_output_dir_holding_an_earlier_run_is_refused(run, ws):
    out = ws.copy("run")
    refused_run(run, tokenizer_main, ws.tokenizer_argv(out=out), ws.tmp, "holds an earlier run", "--overwrite")


def test_overwrite_moves_the_earlier_run_aside_byte_for_byte(run, ws):
    out = ws.copy("run")
    (out / "notes.txt").write_text("mine")  # not the run's: stays where it is
    before = snapshot(out)
    status, lines = run(finetune_main, ws.finetune_argv("--max_steps", 1, "--overwrite", out=out))
    assert status == 0 and not lines, lines  # no error line
    aside = ws.tmp / "run.old-1"
    assert snapshot(aside) == {k: v for k, v in before.items() if not k.startswith("notes.txt")}
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "checkpoints" / "checkpoint-00000001").is_dir()


PATH_CASES = {
    "output-is-a-file": lambda ws: (["--output_dir", ws.file], ["is a file; expected a folder"]),
    "output-under-a-file": lambda ws: (["--output_dir", ws.file / "run"], ["cannot be created", "is a file"]),
    "cache-is-a-file": lambda ws: (["--cache_dir", ws.file], ["--cache_dir", "is a file"]),
    "data-missing": lambda ws: (["--data_dir", ws.tmp / "nowhere"], ["--data_dir", "data folder not found"]),
    "pretrained-missing": lambda ws: (["--pretrained", ws.tmp / "nowhere"], ["model folder not found"]),
    "resume-latest-nothing": lambda ws: (["--resume", "latest"], ["no finished checkpoint", "to resume from"]),
    "resume-missing-folder": lambda ws: (["--resume", ws.tmp / "ckpt"], ["not a finished checkpoint"]),
    "resume-into-another-run": lambda ws: (["--resume", ws.ckpt, "--output_dir", ws.other_run],
                                           ["--resume", "not a checkpoint of --output_dir", "holds another run"]),
    "output-is-pretrained": lambda ws: (["--pretrained", ws.pipe, "--output_dir", ws.pipe], ["holds the --pretrained"]),
    "text-encoder-with-own": lambda ws: (["--pretrained", ws.pipe, "--text_encoder", ws.text_encoder],
                                         ["has its own text encoder"]),
    "official-no-text-encoder": lambda ws: (["--text_encoder", None], ["official layout", "text encoder"]),
    "unfinished-run-folder": lambda ws: (["--pretrained", ws.unfinished], ["training run folder without", "pipeline/"]),
    "single-model-folder": lambda ws: (["--pretrained", ws.pipe / "vae"], ["single model folder"]),
    "text-encoder-empty-folder": lambda ws: (["--text_encoder", ws.empty], ["cannot load the text encoder", "empty"]),
    "prior-without-world-or-prompts": lambda ws: (["--prior_ratio", 0.5], ["--prior_ratio", "declares no world",
                                                                            "--prior_prompts FILE"]),
    "prior-prompts-missing": lambda ws: (["--prior_ratio", 0.5, "--prior_prompts", ws.tmp / "nowhere.txt"],
                                         ["--prior_prompts", "no such file"]),
    "prior-prompts-empty": lambda ws: (["--prior_ratio", 0.5, "--prior_prompts", ws.file_of("\n  \n")],
                                       ["--prior_prompts", "holds no prompt"]),
    "prior-prompts-not-utf8": lambda ws: (["--prior_ratio", 0.5, "--prior_prompts", ws.file_of(b"\xff\xfe cat")],
                                          ["--prior_prompts", "not UTF-8"]),
    "world-unknown": lambda ws: (["--prior_ratio", 0.5, "--pretrained", ws.pipe_declaring("oceans"), "--text_encoder",
                                  None], ["declares the world 'oceans'", "known worlds: shapes"]),
    "world-notes-not-json": lambda ws: (["--prior_ratio", 0.5, "--pretrained", ws.pipe_declaring(None), "--text_encoder",
                                         None], ["bundled.json", "is not a JSON file"]),
    "model-guidance-not-a-number": lambda ws: (["--prior_ratio", 0.5, "--prior_prompts", ws.file_of("a cat\n"),
                                                "--pretrained", ws.pipe_guided_by("high"), "--text_encoder", None],
                                               ["cannot load the pipeline", "guidance_scale", "'high'"]),
}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_finetune_path_is_refused_before_any_work(run, ws, case):
    ws.file = ws.tmp / "a-file"
    ws.file.write_text("x")
    ws.pipe = ws.copy("pipeline")
    ws.other_run = ws.copy("run")
    ws.ckpt = ws.tmp / "elsewhere" / "checkpoint-00000001"
    shutil.copytree(ws.other_run / "checkpoints" / "checkpoint-00000001", ws.ckpt)
    ws.empty = ws.tmp / "empty"
    ws.empty.mkdir()
    ws.unfinished = ws.tmp / "unfinished"
    (ws.unfinished / "checkpoints").mkdir(parents=True)

    def file_of(content):
        path = ws.tmp / "prompts.txt"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def pipe_declaring(world):
        (ws.pipe / "bundled.json").write_text("{" if world is None else json.dumps({"world": world}))
        return ws.pipe

    def pipe_guided_by(guidance):
        index = json.loads((ws.pipe / "model_index.json").read_text())
        (ws.pipe / "model_index.json").write_text(json.dumps(dict(index, guidance_scale=guidance)))
        return ws.pipe

    ws.file_of, ws.pipe_declaring, ws.pipe_guided_by = file_of, pipe_declaring, pipe_guided_by
    extra, parts = PATH_CASES[case](ws)
    argv = [str(a) for a in ws.finetune_argv()]
    for name, value in zip(extra[::2], extra[1::2]):  # replace or drop the flag
        i = argv.index(name) if name in argv else None
        if i is not None:
            del argv[i:i + 2]
        if value is not None:
            argv += [name, str(value)]
    refused_run(run, finetune_main, argv, ws.tmp, *parts)


def test_read_only_output_dir_is_refused(run, ws, monkeypatch):
    def read_only(folder):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli_args, "can_write", read_only)
    refused_run(run, finetune_main, ws.finetune_argv(), ws.tmp, "--output_dir", "cannot write in", "Read-only")
    refused_run(run, tokenizer_main, ws.tokenizer_argv(), ws.tmp, "--output_dir", "Read-only")


def test_captions_that_are_not_utf8(run, ws):
    data = ws.copy("data")
    (data / "metadata.jsonl").write_bytes((data / "metadata.jsonl").read_bytes().replace(b"a ", b"\xe9 "))
    argv = ws.finetune_argv()
    argv[argv.index("--data_dir") + 1] = data
    refused_run(run, finetune_main, argv, ws.tmp, str(data / "metadata.jsonl"), "not UTF-8")


def test_too_few_images_for_one_batch_leaves_nothing_behind(run, ws):
    for extra in ([], ["--cache_dir", ws.tmp / "cache"]):  # found after loading the model; before caching
        refused_run(run, finetune_main, ws.finetune_argv("--batch_size", 8, *extra), ws.tmp, "4 usable samples",
                    "--batch_size")
    refused_run(run, tokenizer_main, ws.tokenizer_argv("--batch_size", 8), ws.tmp, "4 usable samples")


# ---- one loader for every layout ------------------------------------------------------------------

def test_every_layout_is_detected(world, ws):
    assert detect_layout(world["pipeline"]) == ("pipeline", world["pipeline"])
    assert detect_layout(world["run"]) == ("pipeline", world["run"] / "pipeline")  # a training run folder
    assert detect_layout(world["official"]) == ("official", world["official"])
    pipe = HARTPipeline.from_folder(world["run"])
    assert pipe.transformer.config.embed_dim == WIDTH
    assert load_image_tokenizer(world["run"]).config.vocab_size == pipe.vae.config.vocab_size


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_config(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


LOADER_CASES = {
    "truncated-transformer": (lambda p: _truncate(p / "transformer" / "diffusion_pytorch_model.safetensors"),
                              ["transformer/diffusion_pytorch_model.safetensors", "truncated or corrupt"]),
    "truncated-vae": (lambda p: _truncate(p / "vae" / "diffusion_pytorch_model.safetensors"),
                      ["vae/diffusion_pytorch_model.safetensors", "truncated or corrupt"]),
    "truncated-text-encoder": (lambda p: _truncate(p / "text_encoder" / "model.safetensors"),
                               ["text_encoder/model.safetensors", "truncated or corrupt"]),
    "config-wider-than-weights": (lambda p: _edit_config(p / "transformer" / "config.json", embed_dim=2 * WIDTH),
                                  ["transformer/diffusion_pytorch_model.safetensors", "shape mismatches",
                                   f"file ({WIDTH},), model ({2 * WIDTH},)", "transformer/config.json"]),
    "vae-config-other-vocab": (lambda p: _edit_config(p / "vae" / "config.json", vocab_size=99),
                               ["vae/diffusion_pytorch_model.safetensors", "shape mismatches", "model (99,"]),
    "config-deeper-than-weights": (lambda p: _edit_config(p / "transformer" / "config.json", depth=DEPTH + 1),
                                   ["missing keys", f"blocks.{DEPTH}."]),
    "config-not-json": (lambda p: (p / "transformer" / "config.json").write_text("{"),
                        ["transformer/config.json", "not valid JSON"]),
    "config-impossible": (lambda p: _edit_config(p / "transformer" / "config.json", num_heads=7),
                          ["transformer/config.json", "does not describe a HARTTransformer"]),
    "weights-missing": (lambda p: (p / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
                        ["weights file not found", "vae/diffusion_pytorch_model.safetensors"]),
    "component-missing": (lambda p: shutil.rmtree(p / "vae"), ["no config.json in", "vae"]),
}


@pytest.mark.parametrize("case", list(LOADER_CASES))
def test_broken_package_layout_is_one_checkpoint_error(ws, case):
    breaks, parts = LOADER_CASES[case]
    pipe = ws.copy("pipeline")
    breaks(pipe)
    before = snapshot(ws.tmp)
    with pytest.raises(CheckpointError) as e:
        HARTPipeline.from_folder(pipe)
    assert_one_line_error(e, *parts)
    assert snapshot(ws.tmp) == before


def test_broken_run_folder_through_finetune_and_tokenizer_training(run, ws):
    run_dir = ws.copy("run")
    _truncate(run_dir / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors")
    argv = ["--pretrained", run_dir, *ws.finetune_argv()[4:]]
    refused_run(run, finetune_main, argv, ws.tmp, "pipeline/vae/diffusion_pytorch_model.safetensors",
                "truncated or corrupt")
    argv = ["--pretrained", run_dir, *ws.tokenizer_argv()[2:]]
    refused_run(run, tokenizer_main, argv, ws.tmp, "pipeline/vae/diffusion_pytorch_model.safetensors")


def test_text_encoder_argument_rules(world):
    with pytest.raises(CheckpointError) as e:
        HARTPipeline.from_folder(world["official"])
    assert_one_line_error(e, "official layout", "text encoder")
    with pytest.raises(CheckpointError) as e:
        HARTPipeline.from_folder(world["pipeline"], text_encoder=world["text_encoder"])
    assert_one_line_error(e, "has its own text encoder")


# ---- a full disk while saving ---------------------------------------------------------------------

def _fail_saving_at(monkeypatch, step: int, error: Exception, where: str = "checkpoint"):
    import hart.training.export as export
    import hart.training.finetune as ft

    if where == "checkpoint":
        original = ft.save_training_files

        def save(accelerator, folder, ema, train_state):
            if train_state["step"] == step:
                (folder / "partial.bin").write_bytes(b"\0" * 1000)  # what a torn save leaves
                raise error
            return original(accelerator, folder, ema, train_state)

        monkeypatch.setattr(ft, "save_training_files", save)
    else:
        def save_file(*args, **kwargs):
            raise error

        monkeypatch.setattr(export, "save_file", save_file)


DISK_FULL = {
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
    "torch-writer": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2432 vs 2330"),
    "safetensors": Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                             "\"No space left on device\" })"),
}


@pytest.mark.parametrize("kind", list(DISK_FULL))
def test_disk_full_while_saving_a_checkpoint(run, ws, monkeypatch, kind):
    out = ws.copy("run")  # holds checkpoint-00000001
    good = out / "checkpoints" / "checkpoint-00000001"
    before = snapshot(good)
    _fail_saving_at(monkeypatch, 2, DISK_FULL[kind])
    line = assert_refused(run(finetune_main, ws.finetune_argv("--max_steps", 3, "--checkpoint_every", 1,
                                                              "--resume", "latest", out=out)),
                          f"no space left on {out / 'checkpoints'}", "checkpoint-00000002", str(good),
                          "--resume latest")
    assert "disk" in line or "space" in line
    assert snapshot(good) == before
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-00000001"]  # the torn save is gone


def test_disk_full_before_the_first_checkpoint(run, ws, monkeypatch):
    _fail_saving_at(monkeypatch, 1, DISK_FULL["enospc"])
    assert_refused(run(finetune_main, ws.finetune_argv("--max_steps", 1)), "no space left on",
                   "no checkpoint was saved yet", "--overwrite")


def test_disk_full_while_exporting(run, ws, monkeypatch):
    out = ws.tmp / "out"
    _fail_saving_at(monkeypatch, None, DISK_FULL["enospc"], where="export")  # the LoRA adapters' file
    assert_refused(run(finetune_main, ws.finetune_argv("--max_steps", 1, "--lora_rank", 2)),
                   "no space left on", "exporting the pipeline", "checkpoint-00000001", "--resume latest")
    assert not (out / "pipeline.tmp").exists()


def test_disk_full_while_logging_metrics(run, ws, monkeypatch):
    from hart.training.runtime import MetricsLog

    def log(self, step, metrics):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(MetricsLog, "log", log)
    assert_refused(run(finetune_main, ws.finetune_argv("--max_steps", 1)), "no space left on",
                   str(ws.tmp / "out" / "logs" / "metrics.csv"), "--resume latest")


# ---- errors, debugging and real bugs --------------------------------------------------------------

def test_hart_debug_shows_the_traceback(ws, monkeypatch):
    monkeypatch.setenv("HART_DEBUG", "1")  # an error found after parsing is raised with its traceback
    with pytest.raises(SettingError, match="--lora_alpha"):
        finetune_main([str(a) for a in ws.finetune_argv("--lora_rank", 0, "--lora_alpha", 8)])
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        finetune_main([str(a) for a in ws.finetune_argv("--resume", "latest")])


def test_a_real_bug_keeps_its_traceback(ws, monkeypatch):
    import hart.training.finetune as ft

    def broken(cfg, step_callback=None):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(ft, "finetune", broken)
    with pytest.raises(KeyError):
        finetune_main([str(a) for a in ws.finetune_argv()])


@pytest.mark.parametrize("script,argv", [
    ("scripts/finetune.py", ["--pretrained", "p", "--data_dir", "d", "--output_dir", "o", "--batch_size", "0"]),
    ("scripts/train_tokenizer.py", ["--model_config", "c.json", "--data_dir", "d", "--output_dir", "o", "--lr", "nan"]),
])
def test_scripts_print_one_line_and_exit_2(tmp_path, script, argv):
    done = subprocess.run([sys.executable, str(REPO_ROOT / script), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


def test_the_catalogue_size():
    cases = (len(FINETUNE_VALUES) + len(TOKENIZER_VALUES) + len(MODEL_CONFIGS) + len(PATH_CASES) + len(LOADER_CASES)
             + len(DISK_FULL) + 2)
    assert cases >= 70


# ---- fuzzing the command lines --------------------------------------------------------------------

def _flags(parser) -> list:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _check_only(parser, make_config, argv) -> tuple:
    """`run_program` up to the work itself: parse and check -> (status, error lines)."""
    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    log = logging.getLogger("hart.training.cli")
    log.addHandler(handler)
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            status = run_program(parser, argv, make_config, work=lambda cfg: 0)
    finally:
        log.removeHandler(handler)
    return status, [r.getMessage() for r in records] + [line for line in err.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fuzz_paths(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "file.txt").write_text("x")
    (root / "tok.json").write_text(json.dumps({"vocab_size": 64, "latent_channels": 8, "base_channels": 16,
                                               "channel_multipliers": [1, 2], "patch_nums": [1, 2]}))
    return [str(p) for p in (world["official"], world["text_encoder"], world["data"], world["pipeline"], world["run"],
                             world["run"] / "checkpoints" / "checkpoint-00000001", root / "file.txt", root / "tok.json",
                             root / "new-out", root / "missing" / "deeper", root, root / ("n" * 300))]


def _value(paths):
    numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from(["0", "-1", "1e400", "nan", "2**63", "", " ", "latest", "bf16", "ema"]))
    return st.one_of(numbers.map(str), st.text(max_size=20), st.sampled_from(paths),
                     st.text(max_size=300).map(lambda t: "d/" + t))


EDGE_NUMBERS = ["0", "1", "2", "0.5", "1.0", "-1", "nan", "inf", "1e9", str(2**32), str(2**63)]


def _command_lines(parser, base, paths):
    """A valid base command line, often with flags left out, plus up to four flags with random values
    (half of the time a value of the flag's kind: one of its choices, one of `paths`, a number near a limit)."""
    def arg(action):
        fitting = action.choices or (paths if action.type is checks.PATH else EDGE_NUMBERS)
        values = st.one_of(_value(paths), st.sampled_from(fitting))
        return st.tuples(st.sampled_from(action.option_strings), values).map(
            lambda fv: [fv[0]] if action.nargs == 0 else list(fv))

    pairs = range(0, len(base), 2)
    kept = st.one_of(st.just(set(pairs)), st.sets(st.sampled_from(pairs)))
    extra = st.lists(st.sampled_from(_flags(parser)).flatmap(arg), max_size=4)
    return st.tuples(kept, extra).map(lambda ke: [x for i in sorted(ke[0]) for x in base[i:i + 2]]
                                      + [x for a in ke[1] for x in a])


def _fuzz(parser, make_config, base, paths, data):
    argv = data.draw(_command_lines(parser, base, paths))
    status, lines = _check_only(parser, make_config, argv)
    assert status in (0, 2), (argv, status, lines)
    if status == 2:
        assert len(lines) == 1 and "Traceback" not in lines[0] and "error:" in lines[0], (argv, lines)
    else:
        assert not lines, (argv, lines)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_finetune_command_line(world, fuzz_paths, tmp_path_factory, data):
    out = str(tmp_path_factory.getbasetemp() / "fuzz-ft-out")
    base = ["--pretrained", str(world["official"]), "--text_encoder", str(world["text_encoder"]),
            "--data_dir", str(world["data"]), "--output_dir", out]
    _fuzz(finetune_parser(), finetune_config, base, fuzz_paths, data)
    assert not Path(out).exists()  # checking never writes


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_tokenizer_command_line(world, fuzz_paths, tmp_path_factory, data):
    out = str(tmp_path_factory.getbasetemp() / "fuzz-tok-out")
    base = ["--pretrained", str(world["official"]), "--data_dir", str(world["data"]), "--output_dir", out]
    _fuzz(tokenizer_parser(), tokenizer_config, base, fuzz_paths, data)
    assert not Path(out).exists()
