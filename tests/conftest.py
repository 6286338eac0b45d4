"""Test setup: the A1111 host double (tests/host/modules) on sys.path, a tiny SD1 checkpoint,
and a fresh host state per test."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# gradio reads this when a Blocks is made and when it launches: no version check, no telemetry
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

ROOT = Path(__file__).resolve().parent.parent
HOST = Path(__file__).resolve().parent / "host"
for path in (str(ROOT), str(HOST)):
    if path not in sys.path:
        sys.path.insert(0, path)


OMP_SET_HERE = "MOS_TESTS_SET_OMP_NUM_THREADS"  # marks an OMP_NUM_THREADS this file set, not the user


def pytest_configure(config: pytest.Config) -> None:
    """Tiny models gain nothing from intra-op threads, and on a 2-core machine torch's spinning
    worker threads turn a 30 ms forward into seconds whenever another process is busy."""
    import torch

    torch.set_num_threads(1)
    # the same for the processes tests start (the fusion child, the CLI, the demo): with the suite
    # spread over every core (pytest -n), a child's extra threads only contend
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ[OMP_SET_HERE] = "1"  # the real host and its CLIs run without it, as users run them
    # Every test runs as inside the host: importing the double's `modules.paths` installs its
    # `torch.load` guard (modules/safe.py) for the whole process, as the real host does at start.
    import modules.paths  # noqa: F401
    # the built CLIP tokenizer stays out of the user's home
    os.environ.setdefault("MOS_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mos-test-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny random-weight SD1 model saved once per session in the host's checkpoint layout."""
    from lib_mos.models import sd1

    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors"
    sd1.save_checkpoint(sd1.build_tiny_sd1(seed=0), path)
    return path


@pytest.fixture
def host(request, tmp_path, tiny_checkpoint):
    """A host with the tiny checkpoint loaded, default settings, empty caches and no callbacks; with
    this extension installed when the test module sets `WITH_EXTENSION = True`."""
    from host_harness import HostHarness

    extensions = [str(ROOT)] if getattr(request.module, "WITH_EXTENSION", False) else None
    harness = HostHarness(tmp_path, tiny_checkpoint, extensions=extensions)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def browser_page():
    """A fresh headless Debian Chromium (/usr/bin/chromium) with an empty profile: yields the
    `browser.Browser`, whose `page` is open and whose `errors` collects console and page errors.
    Fails when Chromium is missing (`make setup` installs it)."""
    from browser import Browser, ChromiumMissing, require_chromium

    try:
        require_chromium()
    except ChromiumMissing as e:
        pytest.fail(str(e), pytrace=False)
    with Browser() as browser:
        yield browser


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory) -> Path:
    """The tiny random-weight SDXL model saved once per session in the host's SDXL checkpoint layout
    (its widths in the `lib_mos.sdxl_config` metadata; no VAE keys: the double's first stage has none)."""
    from lib_mos.models import sdxl

    path = tmp_path_factory.mktemp("ckpt-xl") / "tiny-sdxl.safetensors"
    sdxl.save_checkpoint(sdxl.build_tiny_sdxl(0), path)
    return path


@pytest.fixture
def host_xl(request, tmp_path, tiny_sdxl_checkpoint):
    """As `host`, with the tiny SDXL checkpoint loaded."""
    from host_harness import HostHarness

    extensions = [str(ROOT)] if getattr(request.module, "WITH_EXTENSION", False) else None
    harness = HostHarness(tmp_path, tiny_sdxl_checkpoint, extensions=extensions)
    try:
        yield harness
    finally:
        harness.close()
