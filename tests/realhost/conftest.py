"""The real AUTOMATIC1111 WebUI v1.10.1 for the real-host suite: `MOS_WEBUI=<a built webui folder>
make test-realhost`. Without MOS_WEBUI every test here is skipped, with the reason printed.

The host is started as users start it (default flags; on this CPU-only machine also `--use-cpu all
--no-half --precision full`, and `--api`), on a fresh data folder holding a random-weight SD1.5
this suite writes (cached between runs), with this checkout linked into its `extensions/`.
`MOS_WEBUI_PYTHON` names its Python if it is not `<webui>/venv/bin/python`.

`test_realforge.py` runs against Forge instead (`MOS_FORGE=<a built forge folder> make
test-realforge`; skipped without MOS_FORGE), started with its own CPU flag (`RealForge`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from webui_process import RealForge, RealForgeClassic, RealHost

FORGE_MODULES = ("test_realforge.py", "test_realforge_sdxl.py")
CLASSIC_MODULES = ("test_realforge_classic.py",)


def pytest_collection_modifyitems(config, items):
    skip_webui = pytest.mark.skip(reason="MOS_WEBUI is not set: the real-host suite needs a built AUTOMATIC1111 "
                                         "v1.10.1 (MOS_WEBUI=<webui folder> make test-realhost)")
    skip_forge = pytest.mark.skip(reason="MOS_FORGE is not set: the real-Forge suite needs a built Forge "
                                         "(MOS_FORGE=<forge folder> make test-realforge; docs/testing.md)")
    skip_classic = pytest.mark.skip(reason="MOS_FORGE_CLASSIC is not set: the real-Forge-Classic suite needs a "
                                           "built Forge Classic (MOS_FORGE_CLASSIC=<folder> make test-realforge-classic)")
    for item in items:
        path = Path(str(item.fspath))
        if not path.is_relative_to(Path(__file__).parent):
            continue
        variable, skip = ("MOS_FORGE", skip_forge) if path.name in FORGE_MODULES else \
            ("MOS_FORGE_CLASSIC", skip_classic) if path.name in CLASSIC_MODULES else ("MOS_WEBUI", skip_webui)
        if not os.environ.get(variable):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_file() -> Path:
    """The random SD1.5, written once and kept in $MOS_REALHOST_CACHE (default ~/.cache/lib_mos)."""
    from sd15_checkpoint import write_random_sd15

    path = _cache() / "sd15-random-seed0.safetensors"
    if not path.exists():
        write_random_sd15(path, seed=0)
    return path


def _cache() -> Path:
    return Path(os.environ.get("MOS_REALHOST_CACHE") or Path.home() / ".cache" / "lib_mos" / "realhost")


@pytest.fixture(scope="session")
def sdxl_checkpoint_file() -> Path:
    """The random SDXL base (fp16, about 6.9 GB), written once and kept beside the SD1.5 one."""
    from sd15_checkpoint import write_random_sdxl

    path = _cache() / "sdxl-random-seed0.safetensors"
    if not path.exists():
        write_random_sdxl(path, seed=0)
    return path


def _running_host(tmp_path_factory, checkpoint: Path, name: str, kind: type[RealHost] = RealHost,
                  variable: str = "MOS_WEBUI"):
    webui = Path(os.environ[variable]).resolve()
    if not (webui / "launch.py").is_file():
        pytest.fail(f"{variable}={webui} is not a WebUI folder (no launch.py)", pytrace=False)
    host = kind(webui, tmp_path_factory.mktemp("webui-data"))
    host.prepare(checkpoint, name)
    host.start()
    try:
        yield host
    finally:
        host.stop()
        print(f"\nreal host log: {host.log}")


@pytest.fixture(scope="module")
def realhost(tmp_path_factory, checkpoint_file):
    """The WebUI with the random SD1.5, for one test module (a host with SDXL loaded takes about
    17 GB on the CPU: two hosts never run at once)."""
    yield from _running_host(tmp_path_factory, checkpoint_file, "sd15-random.safetensors")


@pytest.fixture(scope="module")
def realhost_xl(tmp_path_factory, sdxl_checkpoint_file):
    """The WebUI with the random SDXL base as its only checkpoint."""
    yield from _running_host(tmp_path_factory, sdxl_checkpoint_file, "sdxl-random.safetensors")


@pytest.fixture(scope="module")
def realforge(tmp_path_factory, checkpoint_file):
    """Forge (MOS_FORGE) with the random SD1.5 (about 7 GB on the CPU once loaded)."""
    yield from _running_host(tmp_path_factory, checkpoint_file, "sd15-random.safetensors", RealForge, "MOS_FORGE")


@pytest.fixture(scope="module")
def realforge_xl(tmp_path_factory, sdxl_checkpoint_file):
    """Forge (MOS_FORGE) with the random SDXL base (about 18 GB on the CPU once loaded)."""
    yield from _running_host(tmp_path_factory, sdxl_checkpoint_file, "sdxl-random.safetensors", RealForge,
                             "MOS_FORGE")


@pytest.fixture(scope="module")
def realforge_classic(tmp_path_factory, checkpoint_file):
    """Forge Classic (MOS_FORGE_CLASSIC) with the random SD1.5."""
    yield from _running_host(tmp_path_factory, checkpoint_file, "sd15-random.safetensors", RealForgeClassic,
                             "MOS_FORGE_CLASSIC")
