"""The real AUTOMATIC1111 WebUI v1.10.1 for the real-host suite: `MOS_WEBUI=<a built webui folder>
make test-realhost`. Without MOS_WEBUI every test here is skipped, with the reason printed.

The host is started as users start it (default flags; on this CPU-only machine also `--use-cpu all
--no-half --precision full`, and `--api`), on a fresh data folder holding a random-weight SD1.5
this suite writes (cached between runs), with this checkout linked into its `extensions/`.
`MOS_WEBUI_PYTHON` names its Python if it is not `<webui>/venv/bin/python`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from webui_process import RealHost


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MOS_WEBUI"):
        return
    skip = pytest.mark.skip(reason="MOS_WEBUI is not set: the real-host suite needs a built AUTOMATIC1111 v1.10.1 "
                                   "(MOS_WEBUI=<webui folder> make test-realhost)")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_file() -> Path:
    """The random SD1.5, written once and kept in $MOS_REALHOST_CACHE (default ~/.cache/lib_mos)."""
    from sd15_checkpoint import write_random_sd15

    cache = Path(os.environ.get("MOS_REALHOST_CACHE") or Path.home() / ".cache" / "lib_mos" / "realhost")
    path = cache / "sd15-random-seed0.safetensors"
    if not path.exists():
        write_random_sd15(path, seed=0)
    return path


@pytest.fixture(scope="session")
def realhost(tmp_path_factory, checkpoint_file):
    webui = Path(os.environ["MOS_WEBUI"]).resolve()
    if not (webui / "launch.py").is_file():
        pytest.fail(f"MOS_WEBUI={webui} is not a WebUI folder (no launch.py)", pytrace=False)
    host = RealHost(webui, tmp_path_factory.mktemp("webui-data"))
    host.prepare(checkpoint_file)
    host.start()
    try:
        yield host
    finally:
        host.stop()
        print(f"\nreal host log: {host.log}")
