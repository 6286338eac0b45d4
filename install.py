"""Run by the WebUI at every launch (as `python install.py`, with the webui folder on PYTHONPATH).

Installs only what the host lacks, from requirements.txt. Everything we need ships with
A1111 v1.10.1, so normally this only looks at installed package metadata and returns at once:
it never imports torch or anything heavy.
"""

from __future__ import annotations

import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"


def required_packages(path: Path = REQUIREMENTS) -> list[tuple[str, str]]:
    """(distribution name, requirement line) for every requirement in `path`."""
    out = []
    for raw in path.read_text(encoding="utf8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]
            out.append((name, line))
    return out


PRIVATE_LDM = Path(__file__).resolve().parent / ".mos-ldm"
LDM_REQUIREMENT = "stable-diffusion-sdkit==2.1.5"  # ships only the `ldm` package: the UNet and VAE classes


def needs_private_ldm() -> bool:
    """Whether this host lacks `ldm`, which fusion builds its models with: Forge has none (A1111
    keeps it in repositories/). It goes into the extension's own folder, never the host's venv, and
    only fusion's child process puts it on its path: other extensions that look for `ldm` to tell
    A1111 from Forge still find none in Forge."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lib_mos.hosts import FORGE, detect

    return detect() is FORGE and not (PRIVATE_LDM / "ldm").is_dir()


def install_missing(launch) -> list[str]:
    """Install every requirement `launch.is_installed` does not find, and in Forge the private
    `ldm`; returns what was installed."""
    installed = []
    for name, requirement in required_packages():
        if not launch.is_installed(name):
            launch.run_pip(f'install "{requirement}"', f"{requirement} for Mix-of-Show")
            installed.append(requirement)
    if needs_private_ldm():
        launch.run_pip(f'install --no-deps --target "{PRIVATE_LDM}" "{LDM_REQUIREMENT}"',
                       "ldm for Mix-of-Show's fusion (into the extension's folder)")
        installed.append(LDM_REQUIREMENT)
    return installed


if __name__ == "__main__":
    import launch  # the host's module, importable because the host puts its folder on PYTHONPATH

    install_missing(launch)
