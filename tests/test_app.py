"""The Gradio demo, launched in-process on 127.0.0.1 around the tiny fixture pipeline, driven by gradio_client."""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.utils import REPO_ROOT, free_port, strict_recompiles

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError, Status  # noqa: E402

from hart.app.demo import PHOTO_EXAMPLES, LastRun, build_demo, example_prompts  # noqa: E402
from hart.limits import MAX_GUIDANCE_SCALE, MAX_SEED  # noqa: E402

# gradio 6.31's queue statistics use pandas options that pandas 3 deprecates
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
WAIT = 120  # seconds: generous for 2 busy CPU cores; nothing waits this long when it works


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Gradio's cache and gradio_client's downloads go to a pytest temp folder."""
    root = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(root))
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        mp.setattr(tempfile, "tempdir", str(root))
        yield root


@contextmanager
def serve(pipe, **options):
    demo = build_demo(pipe, **options)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


class TestPipe:
    """The fixture pipeline plus test hooks: "explode" in a prompt fails at the second scale,
    `gate` (when set) holds every call until released, and the most calls ever running at once is kept."""

    __test__ = False

    def __init__(self, pipe, gate=None):
        self._pipe, self.gate, self.started = pipe, gate, threading.Event()
        self._lock, self._running, self.most_at_once = threading.Lock(), 0, 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, prompt, callback_on_step_end, **kwargs):
        with self._lock:
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
        self.started.set()
        try:
            if self.gate is not None:
                assert self.gate.wait(WAIT)

            def callback(pipe, scale_index, side, tensors):
                if "explode" in prompt and scale_index == 1:
                    raise RuntimeError("simulated device failure")
                return callback_on_step_end(pipe, scale_index, side, tensors)

            return self._pipe(prompt=prompt, callback_on_step_end=callback, **kwargs)
        finally:
            with self._lock:
                self._running -= 1


@pytest.fixture(scope="module")
def test_pipe(fixture_pipe):
    return TestPipe(fixture_pipe)


@pytest.fixture(scope="module")
def app_url(test_pipe, sandbox):
    def safety_checker(prompt):
        if "crash" in prompt:
            raise RuntimeError("checker out of memory")
        return "forbidden" in prompt.lower()

    with serve(test_pipe, max_images=4, safety_checker=safety_checker) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url, sandbox):
    return Client(app_url, verbose=False, download_files=str(sandbox / "downloads"))


def request(prompt="a red fox in the snow", negative="", seed=7, randomize=False, guidance=4.5, top_k=0, top_p=1.0,
            more_smooth=True, num_images=1, prune=1.0):
    return [prompt, negative, seed, randomize, guidance, top_k, top_p, more_smooth, num_images, prune]


def run(client, *args, **kwargs):
    """All yielded updates of one /generate call: [(preview, gallery, seed, status), ...]."""
    job = client.submit(*request(*args, **kwargs), api_name="/generate")
    job.result(timeout=WAIT)  # raises the app's error, if any
    return job.outputs()


def images(gallery):
    return [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]


def side_of(pipe) -> int:
    return pipe.transformer.patch_nums[-1] * pipe.vae.downsample_factor


def component(demo, elem_id):
    """The props of the component with this elem_id in a built demo."""
    return next(c["props"] for c in demo.config["components"] if c["props"].get("elem_id") == elem_id)


def test_streams_one_preview_per_scale_then_the_images(client, fixture_pipe):
    updates = run(client, num_images=2)
    num_scales = len(fixture_pipe.transformer.patch_nums)
    previews, final = updates[:-1], updates[-1]
    assert len(previews) == num_scales
    for k, (preview, gallery, seed, status) in enumerate(previews):
        assert gallery == [] and seed == 7 and status.startswith(f"Scale {k + 1}/{num_scales}")
        assert Image.open(preview).size == (512, 256)  # two images side by side, 256 px each
    gallery, seed, status = final[1:]
    pictures = images(gallery)
    side = side_of(fixture_pipe)
    assert len(pictures) == 2 and all(p.shape == (side, side, 3) for p in pictures)
    assert [item["caption"] for item in gallery] == ["seed 7", "seed 8"]
    assert seed == 7 and status.startswith("Done")
    assert all(p.std() > 5 for p in pictures), "blank image"


def test_used_seed_reproduces_the_images(client, fixture_pipe):
    first = run(client, randomize=True, num_images=2)[-1]
    seed = first[2]
    assert isinstance(seed, int) and 0 <= seed <= MAX_SEED
    again = run(client, seed=seed, randomize=False, num_images=2)[-1]
    assert again[2] == seed
    for a, b in zip(images(first[1]), images(again[1])):
        np.testing.assert_array_equal(a, b)
    # ... and the pipeline called directly with generators seed + i draws the same pictures
    direct = fixture_pipe("a red fox in the snow", num_images_per_prompt=2,
                          generator=[torch.Generator().manual_seed(seed + i) for i in range(2)]).images
    for a, b in zip(images(first[1]), direct):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_sampling_options_reach_the_pipeline(client):
    base = images(run(client)[-1][1])[0]
    for options in (dict(guidance=0.0), dict(top_k=5), dict(top_p=0.3), dict(more_smooth=False),
                    dict(negative="blurry"), dict(prune=0.25)):
        changed = images(run(client, **options)[-1][1])[0]
        assert not np.array_equal(base, changed), f"{options} made no difference"


@pytest.mark.parametrize("changes, message", [
    (dict(prompt=""), "Please enter a prompt"),
    (dict(prompt="   \n"), "Please enter a prompt"),
    (dict(prompt="x" * 2001), "keep it under 2000"),
    (dict(guidance=MAX_GUIDANCE_SCALE + 1), f"Guidance scale must be a number from 0 to {MAX_GUIDANCE_SCALE:g}"),
    (dict(guidance=-1), "Guidance scale"),
    (dict(top_k=-1), "Top-k must be a whole number from 0 to {vocab}"),
    (dict(top_k=2.5), "Top-k"),
    (dict(top_p=0), "Top-p must be a number above 0 and at most 1"),
    (dict(top_p=1.5), "Top-p"),
    (dict(num_images=0), "Number of images must be a whole number from 1 to 4"),
    (dict(num_images=5), "Number of images"),
    (dict(seed=-1), f"Seed must be a whole number from 0 to {MAX_SEED}"),
    (dict(seed=None), "Seed"),
    (dict(prune=0), "Token pruning must be a number above 0 and at most 1"),
    (dict(prune=1.5), "Token pruning"),
])
def test_invalid_input_gets_a_friendly_message(client, fixture_pipe, changes, message):
    with pytest.raises(AppError, match=message.format(vocab=fixture_pipe.transformer.config.vocab_size)):
        run(client, **changes)


def test_error_inside_generation_is_shown_logged_and_the_app_keeps_serving(client, caplog):
    with pytest.raises(AppError, match="Generation failed: RuntimeError: simulated device failure"):
        run(client, prompt="explode")
    assert any(r.name == "hart.app.demo" and r.exc_info for r in caplog.records), "the failure was not logged"
    assert len(images(run(client)[-1][1])) == 1


def test_safety_hook_refuses_flagged_prompts(client):
    with pytest.raises(AppError, match="safety checker flagged this prompt"):
        run(client, prompt="something FORBIDDEN")
    with pytest.raises(AppError, match="The safety checker failed: RuntimeError: checker out of memory"):
        run(client, prompt="crash")


def test_eight_concurrent_clients_are_queued_and_served(app_url, test_pipe, sandbox):
    def one_client(i):
        c = Client(app_url, verbose=False, download_files=str(sandbox / f"client{i}"))
        return run(c, prompt=f"prompt number {i}", seed=i)[-1]

    with ThreadPoolExecutor(8) as pool:
        finals = list(pool.map(one_client, range(8)))
    assert [len(images(f[1])) for f in finals] == [1] * 8
    assert [f[2] for f in finals] == list(range(8))
    assert test_pipe.most_at_once == 1, "generations overlapped despite concurrency 1"
    with urllib.request.urlopen(app_url, timeout=30) as page:  # still responsive
        assert page.status == 200
    after = Client(app_url, verbose=False, download_files=str(sandbox / "after"))
    assert len(images(run(after)[-1][1])) == 1


def test_a_full_queue_refuses_with_a_clear_message(fixture_pipe, sandbox):
    gated = TestPipe(fixture_pipe, gate=threading.Event())
    with serve(gated, max_queue=1) as url:
        c = Client(url, verbose=False, download_files=str(sandbox / "queue"))
        running = c.submit(*request(), api_name="/generate")
        assert gated.started.wait(WAIT)
        waiting = c.submit(*request(seed=8), api_name="/generate")
        deadline = time.monotonic() + WAIT
        while waiting.status().code != Status.IN_QUEUE:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.05)
        refused = c.submit(*request(seed=9), api_name="/generate")
        with pytest.raises(QueueError, match="Queue is full"):
            refused.result(timeout=WAIT)
        gated.gate.set()
        for job in (running, waiting):
            job.result(timeout=WAIT)
            assert len(job.outputs()[-1][1]) == 1


def test_command_line(fixtures, sandbox):
    from hart.app.__main__ import build_parser, main

    args = build_parser().parse_args(["--model", "m"])
    assert (args.host, args.port, args.share, args.concurrency, args.max_queue, args.max_images) == \
        ("127.0.0.1", 7860, False, 1, 20, 4)
    assert main(["--model", str(sandbox / "missing")]) == 2
    assert main(["--model", str(fixtures / "ckpt"), "--safety-model", str(sandbox / "missing")]) == 2
    done = subprocess.run([sys.executable, "-m", "hart.app", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 0 and "--model" in done.stdout and "--share" in done.stdout
    assert done.stdout.startswith("usage: python -m hart.app ")
    done = subprocess.run([sys.executable, "-m", "hart.cli", "app", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=WAIT)
    assert done.returncode == 0 and done.stdout.startswith("usage: hart app ") and "--model" in done.stdout
    assert "python -m" not in done.stdout
    done = subprocess.run([sys.executable, "-m", "hart.cli", "app", "--port", "0"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=WAIT)
    assert done.returncode == 2 and "hart app: error: argument --port" in done.stderr


@pytest.fixture(scope="module")
def bundled_pipe():
    from hart import HARTPipeline
    from hart.bundled import BUNDLED_MODEL

    return HARTPipeline.from_pretrained(BUNDLED_MODEL)


def test_example_prompts_are_the_bundled_models_own(bundled_pipe):
    from hart.bundled import BUNDLED_MODEL
    from hart.eval.shapes_eval import load_prompts

    shipped = json.loads((Path(BUNDLED_MODEL) / "examples.json").read_text())
    assert example_prompts(bundled_pipe) == shipped
    # each is a ShapesEval prompt, so how well the model draws it can be measured (tests/test_app_browser.py)
    assert set(shipped) <= {p["prompt"] for p in load_prompts()}
    assert component(build_demo(bundled_pipe), "examples")["samples"] == [[p] for p in shipped]


def test_a_model_without_examples_keeps_the_photo_prompts(fixture_pipe, tmp_path):
    assert fixture_pipe.name_or_path is None  # the official layout: no pipeline folder
    assert component(build_demo(fixture_pipe), "examples")["samples"] == [[p] for p in PHOTO_EXAMPLES]
    assert example_prompts(SimpleNamespace(name_or_path=str(tmp_path))) == list(PHOTO_EXAMPLES)
    (tmp_path / "examples.json").write_text('["a cat", "a dog on a sofa"]')
    assert example_prompts(SimpleNamespace(name_or_path=str(tmp_path))) == ["a cat", "a dog on a sofa"]


@pytest.mark.parametrize("text, message", [
    ("[\"a cat\",", "is not valid JSON"),
    ('{"prompts": ["a cat"]}', "must be a JSON list of non-empty prompt strings"),
    ("[]", "must be a JSON list"),
    ('["a cat", "  "]', "must be a JSON list"),
    ('["a cat", 3]', "must be a JSON list"),
])
def test_a_broken_examples_file_is_named(tmp_path, text, message):
    (tmp_path / "examples.json").write_text(text)
    with pytest.raises(ValueError, match=f"examples.json {message}"):
        example_prompts(SimpleNamespace(name_or_path=str(tmp_path)))


def long_text(tokenizer, more_than: int) -> str:
    """A prompt of more than `more_than` tokens (and under the app's character limit)."""
    words = "a small red circle above a large blue square on a green background"
    text = words
    while len(tokenizer(text)["input_ids"]) <= more_than:
        text += ", " + words
    assert len(text) <= 2000, "the model reads more tokens than the app allows characters"
    return text


def test_a_cut_prompt_is_noted_in_the_status(client, fixture_pipe):
    tokenizer, max_tokens = fixture_pipe.tokenizer, fixture_pipe.transformer.config.context_tokens
    prompt = long_text(tokenizer, max_tokens)
    n = len(tokenizer(prompt)["input_ids"])
    updates = run(client, prompt=prompt)
    note = f"Prompt cut: {max_tokens} of {n} tokens kept."
    assert all(status.endswith(note) for *_, status in updates), [u[-1] for u in updates]
    assert updates[-1][-1].startswith("Done")
    negative = long_text(tokenizer, max_tokens + 5)
    status = run(client, prompt=prompt, negative=negative)[-1][-1]
    m = len(tokenizer(negative)["input_ids"])
    assert status.endswith(f"{note} Negative prompt cut: {max_tokens} of {m} tokens kept.")
    assert "cut" not in run(client, prompt="a red fox")[-1][-1]


def test_banner_states_device_dtype_and_the_last_measured_time(fixture_pipe):
    device, dtype = fixture_pipe._execution_device, str(fixture_pipe.transformer.dtype).removeprefix("torch.")
    banner = component(build_demo(fixture_pipe), "banner")["value"]
    assert banner == f"Running on `{device}` with {dtype} weights; no image generated yet."
    assert "slow" not in banner and "GPU" not in banner
    last_run = LastRun(fixture_pipe)
    last_run.record(0.9, 3)
    assert last_run.banner() == f"Running on `{device}` with {dtype} weights; the last image took 0.30 s."


@pytest.mark.parametrize("flags", [[], ["--compile"]])
def test_main_loads_the_model_and_serves_on_localhost(flags, fixtures, sandbox, monkeypatch, capsys):
    """`python -m hart.app`'s main() end to end, except that it returns instead of serving until Ctrl+C;
    with --compile, the model compiles before the app serves."""
    import gradio as gr

    from hart.app.__main__ import main

    launched = {}
    original = gr.Blocks.launch

    def launch(demo, **kwargs):
        launched.update(kwargs, demo=demo)
        return original(demo, **kwargs)

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda demo: None)
    port = free_port()
    with strict_recompiles(4):  # the requests reuse what the warm-up image compiled
        assert main(["--model", str(fixtures / "ckpt"), "--text-encoder", str(fixtures / "ckpt" / "text_encoder"),
                     "--port", str(port), "--max-images", "2", *flags]) == 0
        try:
            assert (launched["server_name"], launched["server_port"], launched["share"]) == ("127.0.0.1", port, False)
            out = capsys.readouterr().out
            assert f"HART demo on http://127.0.0.1:{port}/" in out
            assert ("compiling the model with one warm-up image" in out) == bool(flags)
            c = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(sandbox / "main"))
            assert len(images(run(c, num_images=2)[-1][1])) == 2
            with pytest.raises(AppError, match="Number of images must be a whole number from 1 to 2"):
                run(c, num_images=3)
        finally:
            launched["demo"].close()


def test_shieldgemma_checker_loads_lazily_from_a_local_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    from hart.app.safety import ShieldGemmaChecker

    with pytest.raises(FileNotFoundError, match="not a model folder"):
        ShieldGemmaChecker(tmp_path / "missing")
    words = ["<pad>", "<eos>", "<bos>", "<unk>", "Yes", "No", "Human", "Question", "policy"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                            bos_token="<bos>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                                   eos_token_id=1, bos_token_id=2)).save_pretrained(tmp_path)
    checker = ShieldGemmaChecker(tmp_path, device="cpu")
    assert checker._model is None  # nothing loaded until the first prompt
    p = checker.unsafe_probability("a policy question")
    assert 0 < p < 1 and checker._model is not None
    assert checker("a policy question") == (p > 0.5)
    assert ShieldGemmaChecker(tmp_path, device="cpu", threshold=0.0)("x") is True
    assert ShieldGemmaChecker(tmp_path, device="cpu", threshold=1.0)("x") is False


# ---- the inpainting tab ------------------------------------------------------------------------------

def editor_value(tmp_path, side, box, painted=True):
    """What the browser sends: the uploaded picture and one brush layer (transparent except the strokes)."""
    from gradio_client import handle_file

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    if painted:
        layer.paste((255, 255, 255, 255), box)
    picture.save(tmp_path / "picture.png")
    layer.save(tmp_path / "layer.png")
    return picture, {"background": handle_file(str(tmp_path / "picture.png")),
                     "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": None}


def test_inpaint_tab_repaints_the_painted_area(client, fixture_pipe, tmp_path):
    from hart.pipelines import HARTInpaintPipeline

    side = side_of(fixture_pipe)
    box = (side // 4, side // 4, 3 * side // 4, 3 * side // 4)
    picture, value = editor_value(tmp_path, side, box)
    result, seed, status = client.predict(value, "a red circle", 11, False, 3.0, 2, api_name="/inpaint")
    assert seed == 11 and status.startswith("Done in")
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, box)
    expected = HARTInpaintPipeline.from_pipe(fixture_pipe)(
        "a red circle", image=picture, mask_image=mask, blend_radius=2, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(11)).images[0]
    assert np.array_equal(np.asarray(Image.open(result).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("painted,prompt,message", [
    (False, "a red circle", "the mask is empty"),
    (True, "   ", "Please enter a prompt"),
])
def test_inpaint_tab_explains_bad_input(client, fixture_pipe, tmp_path, painted, prompt, message):
    side = side_of(fixture_pipe)
    _, value = editor_value(tmp_path, side, (side // 8, side // 8, 3 * side // 8, 3 * side // 8), painted)
    with pytest.raises(Exception, match=message):
        client.predict(value, prompt, 1, False, 3.0, 0, api_name="/inpaint")
