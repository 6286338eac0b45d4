"""The extension in a real Forge (lllyasviel's, f2), as a user meets it today: Forge is detected,
the extension says in the console, its tabs and the Script panel that it does not run there yet,
installs nothing, hooks nothing, and the plain image stays pixel-identical with concept tokens,
the always-on script and a refused dropdown request in between (`MOS_FORGE=<forge> make
test-realforge`; docs/testing.md says how that Forge is built offline).
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import numpy as np
import pytest
from webui_process import HostError, images, pixels

MESSAGE = "Mix-of-Show does not run in Forge yet"
PLAIN = dict(prompt="a photo of a house by a lake", seed=7)
STATE: dict = {}


def test_install_is_clean(realforge):
    """install.py, run as Forge runs it (its Python, the Forge folder on PYTHONPATH), installs nothing:
    everything it needs ships with Forge."""
    env = {**os.environ, "PYTHONPATH": str(realforge.webui)}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run([str(realforge.python), "install.py"], cwd=realforge.extension, env=env,
                          capture_output=True, text=True, timeout=600)
    print("install.py:", done.returncode, done.stdout[-500:], done.stderr[-500:])
    assert done.returncode == 0 and "Installing" not in done.stdout + done.stderr


def test_plain_image_before(realforge):
    start = time.perf_counter()
    STATE["plain"] = pixels(realforge.txt2img(**PLAIN))
    print(f"Forge SD1.5 plain 128x128, 2 steps: {time.perf_counter() - start:.1f} s (model load included); "
          f"RSS {realforge.rss_bytes() / 2**30:.1f} GiB")
    assert STATE["plain"].shape == (128, 128, 3)


def test_the_console_says_it_once_and_no_traceback_names_the_extension(realforge):
    log = realforge.log_text()
    lines = [line for line in log.splitlines() if MESSAGE in line]
    print("console:", lines)
    assert len(lines) == 1
    chunks = log.split("Traceback (most recent call last)")[1:]
    ours = [c[:1500] for c in chunks if "mix-of-show" in c.lower() or "mos_" in c]
    assert not ours, ours


def test_scripts_are_listed_and_concept_tokens_stay_text(realforge):
    listed = realforge.get("/sdapi/v1/scripts")
    print("scripts:", listed)
    assert "mix-of-show" in [s.lower() for s in listed["txt2img"]]
    res = realforge.txt2img("a photo of <cat1> <cat2>", seed=3)
    assert len(images(res)) == 1 and "Mix-of-Show" not in res["info"]


def test_the_dropdown_refuses_with_the_message(realforge):
    with pytest.raises(HostError) as refused:
        realforge.txt2img("a photo", script_name="Mix-of-Show",
                          script_args=['{"regions": [{"prompt": "a cat", "box": [0, 0, 1, 1]}]}'])
    print("dropdown:", refused.value.status, refused.value.body[:400])
    assert MESSAGE in refused.value.body


def test_tabs_and_script_panel_show_the_message_in_chromium(realforge):
    """Forge's page is gradio 4's: the Script dropdown's options are picked by their text."""
    from browser import Browser

    with Browser() as browser:
        page = browser.page
        page.goto(realforge.url, timeout=120_000)
        page.click("#script_list input", timeout=120_000)
        page.locator("#script_list ul.options li", has_text=re.compile(r"Mix-of-Show\s*$")).first.click()
        panel = page.inner_text("#script_mixofshow_unsupported", timeout=60_000)
        print("script panel:", panel)
        assert MESSAGE in panel
        for title, elem in (("Mix-of-Show fusion", "mos_fusion"), ("Mix-of-Show training", "mos_train")):
            page.click(f"#tabs > .tab-nav > button:has-text('{title}')", timeout=120_000)
            text = page.inner_text(f"#{elem}_unsupported", timeout=60_000)
            print(f"{title} tab:", text)
            assert MESSAGE in text
        page.screenshot(path=str(realforge.data / "forge-training-tab.png"))
        ours = [e for e in browser.errors if "mix_of_show" in e.lower() or "mos" in e.lower()]
        print("console errors:", browser.errors[:5])
        assert not ours, ours


def test_plain_image_after_everything_is_identical(realforge):
    after = pixels(realforge.txt2img(**PLAIN))
    difference = np.abs(after - STATE["plain"]).max()
    print("plain image after: max pixel difference", difference)
    assert difference == 0
