"""The demo in a real browser: Debian's Chromium, headless, driven by Playwright, kept off the network.

`.ci/run` installs Chromium, so CI always runs this test; on a machine without it the test skips and
says how to install it. The screenshot lands in tests/artifacts/app.png.
"""
import io
import os
import shutil
import socket
import tempfile
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from tests.utils import REPO_ROOT

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from hart.app.demo import build_demo  # noqa: E402

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


def test_generate_in_the_browser(fixture_pipe, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("needs Chromium: `apt-get install -y chromium chromium-driver` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path))
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
        mp.setattr(tempfile, "tempdir", str(tmp_path))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo = build_demo(fixture_pipe)
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
                    env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg-config"),
                             XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), HOME=str(tmp_path)))
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    requested = []
                    page.on("request", lambda r: requested.append(r.url))
                    page.goto(url)
                    page.locator("#prompt textarea").fill("a red fox in the snow")
                    page.locator("#generate").click()
                    result = page.locator("#gallery img").first
                    result.wait_for(timeout=TIMEOUT_MS)
                    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=result.element_handle(),
                                           timeout=TIMEOUT_MS)
                    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
                    picture = np.asarray(Image.open(io.BytesIO(page.request.get(result.get_attribute("src")).body()))
                                         .convert("RGB"))
                    assert picture.shape == (64, 64, 3) and picture.std() > 5, "blank result image"
                    assert page.locator("#preview img").count() == 1, "no live preview was shown"
                    assert page.locator("#status textarea").input_value().startswith("Done")
                    ARTIFACTS.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
                finally:
                    browser.close()
        finally:
            demo.close()
    outside = {u for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss")
               and urlparse(u).hostname != "127.0.0.1"}
    assert not outside, f"the page reached outside this machine: {sorted(outside)}"
