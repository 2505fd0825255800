"""The demo in a real browser: Debian's Chromium, headless, driven by Playwright, kept off the network.

`.ci/run` installs Chromium, so CI always runs these tests; on a machine without it they skip and
say how to install it. A screenshot of the bundled demo lands in tests/artifacts/app.png.
"""
import io
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from tests.utils import REPO_ROOT

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from hart.app.demo import MAX_PROMPT_CHARS, build_demo, example_prompts  # noqa: E402

# gradio 6.31's queue statistics use pandas options that pandas 3 deprecates
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # no name outside this machine resolves
]
TIMEOUT_MS = 120_000
# The bundled model draws the first example prompt right for each of seeds 0-23 (ShapesEval, CPU, float32).
EXAMPLE_SEED = 3


@pytest.fixture(scope="module")
def bundled_pipe():
    from hart import HARTPipeline
    from hart.bundled import BUNDLED_MODEL

    return HARTPipeline.from_pretrained(BUNDLED_MODEL)


@contextmanager
def demo_page(pipe, tmp_path):
    """A page of `build_demo(pipe)` served on 127.0.0.1; afterwards, checks that it reached nothing outside."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Chromium: `apt-get install -y chromium chromium-driver` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    requested = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path))
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
        mp.setattr(tempfile, "tempdir", str(tmp_path))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo = build_demo(pipe)
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
                    env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg-config"),
                             XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), HOME=str(tmp_path)))
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    page.set_default_timeout(TIMEOUT_MS)
                    page.on("request", lambda r: requested.append(r.url))
                    page.goto(url)
                    yield page
                finally:
                    browser.close()
        finally:
            demo.close()
    outside = {u for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss")
               and urlparse(u).hostname != "127.0.0.1"}
    assert not outside, f"the page reached outside this machine: {sorted(outside)}"


def result_image(page) -> np.ndarray:
    """The first image of the result gallery, once loaded, as the server's PNG."""
    result = page.locator("#gallery img").first
    result.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=result.element_handle())
    return np.asarray(Image.open(io.BytesIO(page.request.get(result.get_attribute("src")).body())).convert("RGB"))


def error_badges(page) -> dict:
    """How many red "Error" badges the seed box, live preview and result gallery show."""
    return {name: page.locator(f"#{name} .error").count() for name in ("seed", "preview", "gallery")}


def test_generate_in_the_browser(fixture_pipe, tmp_path):
    side = fixture_pipe.transformer.patch_nums[-1] * fixture_pipe.vae.downsample_factor
    with demo_page(fixture_pipe, tmp_path) as page:
        page.locator("#prompt textarea").fill("a red fox in the snow")
        page.locator("#generate").click()
        picture = result_image(page)
        assert picture.shape == (side, side, 3) and picture.std() > 5, "blank result image"
        assert page.locator("#gallery img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]") == \
            [side, side]
        assert page.locator("#preview img").count() == 1, "no live preview was shown"
        assert page.locator("#status textarea").input_value().startswith("Done")


def test_first_example_is_drawn_as_it_asks(bundled_pipe, tmp_path):
    """Click the bundled demo's first example prompt, generate: ShapesEval finds what the prompt asks for."""
    from playwright.sync_api import expect

    from hart.eval.shapes_eval import evaluate, load_prompts

    first = example_prompts(bundled_pipe)[0]
    spec = next(p for p in load_prompts() if p["prompt"] == first)
    with demo_page(bundled_pipe, tmp_path) as page:
        page.locator("#examples button.gallery-item").first.click()
        expect(page.locator("#prompt textarea")).to_have_value(first)  # filled in by a call to the server
        page.locator("#randomize-seed input").uncheck()
        page.locator("#seed input").fill(str(EXAMPLE_SEED))
        page.locator("#generate").click()
        picture = result_image(page)
        checks = evaluate(picture, spec)
        assert checks["passed"], f"{first!r}, seed {EXAMPLE_SEED}: {checks}"
        page.wait_for_function("() => document.querySelector('#banner').innerText.includes('the last image took')")
        device = str(bundled_pipe._execution_device)
        assert f"Running on {device} with float32 weights" in page.locator("#banner").inner_text()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
    # the page shows what the pipeline draws for that seed
    expected = bundled_pipe(first, generator=[torch.Generator().manual_seed(EXAMPLE_SEED)]).images[0]
    np.testing.assert_array_equal(picture, np.asarray(expected))


def test_errors_keep_the_form_and_clear_when_the_next_run_starts(bundled_pipe, tmp_path):
    tokenizer, max_tokens = bundled_pipe.tokenizer, bundled_pipe.transformer.config.context_tokens
    long_prompt = ", ".join(["a red circle in the picture"] * 8)
    n = len(tokenizer(long_prompt)["input_ids"])
    assert n > max_tokens
    toasts = ".toast-message-text"  # one per error message (gradio groups them in one toast)
    with demo_page(bundled_pipe, tmp_path) as page:
        page.locator("#randomize-seed input").uncheck()
        page.locator("#seed input").fill("1234")
        page.locator("#generate").click()  # no prompt
        page.locator(toasts).filter(has_text="Please enter a prompt").wait_for()
        page.locator("#prompt textarea").fill("x" * (MAX_PROMPT_CHARS + 1))
        page.locator("#generate").click()
        page.locator(toasts).filter(has_text="keep it under").wait_for()
        assert page.locator(toasts).count() == 1, "the first error's message is still shown"
        assert page.locator("#seed input").input_value() == "1234"
        assert error_badges(page) == {"seed": 0, "preview": 0, "gallery": 0}
        assert page.locator("#status .error").count() == 1  # the error shows where the run reports

        page.locator("#prompt textarea").fill(long_prompt)
        page.locator("#generate").click()
        page.wait_for_function(f"() => document.querySelectorAll('{toasts}').length === 0")
        assert result_image(page).std() > 5, "blank result image"
        status = page.locator("#status textarea").input_value()
        assert status.startswith("Done") and status.endswith(f"Prompt cut: {max_tokens} of {n} tokens kept."), status
        assert page.locator("#seed input").input_value() == "1234"
        assert error_badges(page) == {"seed": 0, "preview": 0, "gallery": 0}
        assert page.locator("#status .error").count() == 0
