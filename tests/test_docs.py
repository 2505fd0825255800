"""The README and docs/ as a user meets them: every README command runs, every link and image exists.

The README's commands run in README order in one scratch folder, offline, on CPU. `hart-pipeline` there
is a copy of the bundled model (standing in for a converted release), `my_images` a few shapes-world
renders, `picture.png`/`mask.png`/`small.png` small edit inputs. A command is first parsed as written
by its own program's parser (so every flag in the README exists and takes the value shown), then run,
at toy size where the written one takes minutes (`TOY`). `pip install` lines are checked against
pyproject.toml, not run. A README command of any other program fails the test: add it here.
"""
import re
import runpy
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.utils import REPO_ROOT

README = REPO_ROOT / "README.md"
DOC_PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
FIXTURE_CKPT = REPO_ROOT / "tests" / "fixtures" / "official-tiny" / "ckpt"

# Flag values that run a command at toy size (replaced, or added where the command leaves the flag at
# its default); the command is still parsed as written first.
TOY = {
    "hart benchmark": {"--config": "tiny", "--warmup": "1", "--iters": "1"},  # one warm-up call compiles
    "hart convert": {"--model": str(FIXTURE_CKPT), "--text-encoder": str(FIXTURE_CKPT / "text_encoder"),
                     "--out": "converted"},
    "scripts/finetune.py": {"--max_steps": "2", "--tokenizer_steps": "2"},
    "scripts/train_tokenizer.py": {"--max_steps": "2"},
}
HELP_ONLY = {"hart app"}  # starts a server that runs until stopped: parsed as written, then `--help` runs
NOT_RUN = {"python -m pytest -q": "the test suite itself"}
DIARY_WORDS = re.compile(r"\b(sessions?|so far|today|yesterday)\b", re.IGNORECASE)


def shell_lines(block: str):
    """Command lines of a bash block: continuations joined, comments and blank lines dropped."""
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield words


def split_and(words):
    """`a && b` as [a, b]."""
    command = []
    for word in [*words, "&&"]:
        if word == "&&":
            yield command
            command = []
        else:
            command.append(word)


def with_toy_values(argv, toy: dict):
    argv = list(argv)
    for flag, value in toy.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def check_pip_install(words):
    """`pip install torch==X` or `pip install -e .[extras]`: the extras must exist in pyproject.toml."""
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert words[:2] == ["pip", "install"], words
    for spec in words[2:]:
        if spec == "-e" or spec.startswith("torch=="):
            continue
        match = re.fullmatch(r"\.(?:\[([\w,]+)\])?", spec)
        assert match, f"README installs {spec!r}: only torch and this package (with extras) are expected"
        for extra in filter(None, (match.group(1) or "").split(",")):
            assert extra in extras, f"README installs the extra {extra!r}, which pyproject.toml does not define"


def run_hart(argv):
    from accelerate.state import PartialState
    from hart.cli import build_parser, main

    build_parser().parse_known_args(argv)  # argparse exits (failing the test) on a flag that does not exist
    name = f"hart {argv[0]}"
    if name in HELP_ONLY:
        from hart.app.__main__ import build_parser as app_parser

        app_parser().parse_args(argv[1:])
        argv = [argv[0], "--help"]
    try:
        assert main(with_toy_values(argv, TOY.get(name, {}))) == 0, f"`hart {' '.join(argv)}` failed"
    finally:
        PartialState._reset_state()  # `hart generate` creates accelerate's process-wide state


def run_script(script: str, argv):
    program = runpy.run_path(str(REPO_ROOT / script))  # not as __main__: defines build_parser and main
    program["build_parser"]().parse_args(argv)
    assert program["main"](with_toy_values(argv, TOY.get(script, {}))) == 0, f"`{script}` failed"


def run_command(words, monkeypatch):
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        monkeypatch.setenv(*words.pop(0).split("=", 1))
    if words[:2] == ["accelerate", "launch"]:  # the launcher's options are checked; its program runs here, once
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(words[2:])
        words = (["hart"] if launch.module and launch.training_script == "hart.cli" else ["python", launch.training_script]) \
            + launch.training_script_args
    if words[0] == "hart":
        run_hart(words[1:])
    elif words[0] == "python" and words[1].startswith("scripts/"):
        run_script(words[1], words[2:])
    else:
        pytest.fail(f"README command `{shlex.join(words)}` is not exercised by tests/test_docs.py")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from hart.bundled import BUNDLED_MODEL
    from hart.data.shapes_dataset import write_dataset

    shutil.copytree(BUNDLED_MODEL, tmp_path / "hart-pipeline")
    write_dataset(tmp_path / "my_images", 16, seed=0)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square in the top left\n")
    Image.new("RGB", (128, 128), (128, 128, 128)).save(tmp_path / "picture.png")
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle([36, 36, 91, 91], fill=255)
    mask.save(tmp_path / "mask.png")
    Image.new("RGB", (64, 64), (40, 80, 220)).save(tmp_path / "small.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_every_readme_command_runs(workdir, monkeypatch, one_thread):
    text = README.read_text()
    blocks = re.findall(r"^```(bash|python)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    namespace = {}  # each Python block continues the previous one, as typed into one interpreter
    for language, block in blocks:
        if language == "python":
            exec(compile(block, str(README), "exec"), namespace)
            continue
        for words in shell_lines(block):
            for command in split_and(words):
                if command[:2] == ["pip", "install"]:
                    check_pip_install(command)
                elif shlex.join(command) not in NOT_RUN:
                    run_command(command, monkeypatch)
    # what the README promises the first commands write
    assert (workdir / "outputs" / "00000_00.png").is_file()
    assert (workdir / "fox.png").is_file() and (workdir / "out" / "grid.png").is_file()
    assert (workdir / "run" / "pipeline" / "model_index.json").is_file()


def heading_anchors(path: Path):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_relative_links_and_images_exist(page):
    missing = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            missing.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{page.name} links to what does not exist: {missing}"


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_pages_state_results_not_development_history(page):
    found = [line.strip() for line in page.read_text().splitlines() if DIARY_WORDS.search(line)]
    assert not found, f"{page.name} dates things by when they were worked on: {found}"


def test_the_training_tutorial_runs(workdir, monkeypatch, one_thread):
    """docs/training.md's tutorial, command by command (training at toy size), from a clean folder."""
    text = (REPO_ROOT / "docs" / "training.md").read_text()
    section = text.split("## Teach the bundled model a new shape\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert blocks, "the tutorial has no commands"
    for block in blocks:
        for words in shell_lines(block):
            for command in split_and(words):
                run_command(command, monkeypatch)
    assert len(list((workdir / "green_stars").glob("*.png"))) == 48
    assert (workdir / "runs" / "star" / "pipeline" / "model_index.json").is_file()
    assert (workdir / "star_samples" / "grid.png").is_file()
