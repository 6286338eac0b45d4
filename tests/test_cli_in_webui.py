"""The CLIs run with a WebUI's own Python from the extension's folder: the WebUI keeps `ldm` in
`repositories/stable-diffusion-stability-ai`, on sys.path only while the WebUI runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The WebUI's venv has no `ldm` package; this test's venv has one, so the probe hides it from the
# look-up the CLI makes until the fake WebUI's repositories folder is on sys.path.
PROBE = r"""
import importlib.util, sys
from pathlib import Path
allowed, find_spec = sys.argv[1], importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name == "ldm" and allowed not in sys.path else find_spec(name, package))
import lib_mos.cli.main as cli
added = cli.use_webui_packages()
import ldm
print(added, Path(ldm.__file__).parent.parent)
"""


def _fake_webui(tmp_path: Path) -> Path:
    webui = tmp_path / "webui"
    repo = webui / "repositories" / "stable-diffusion-stability-ai" / "ldm" / "modules"
    repo.mkdir(parents=True)
    (repo.parent / "__init__.py").write_text("")
    (repo / "__init__.py").write_text("")
    return webui


def test_ldm_is_found_in_the_webui_this_extension_sits_in(tmp_path):
    webui = _fake_webui(tmp_path)
    extension = webui / "extensions" / "sd-webui-mix-of-show"
    extension.parent.mkdir()
    extension.symlink_to(ROOT, target_is_directory=True)
    repo = webui / "repositories" / "stable-diffusion-stability-ai"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(repo)], cwd=extension, capture_output=True, text=True,
                          env={"PWD": str(extension), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    added, found = proc.stdout.split()
    assert added == str(repo) and found == str(repo)


def test_mos_webui_names_the_install(tmp_path):
    webui = _fake_webui(tmp_path)
    repo = webui / "repositories" / "stable-diffusion-stability-ai"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(repo)], cwd=ROOT, capture_output=True, text=True,
                          env={"MOS_WEBUI": str(webui), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == str(repo)


def test_without_ldm_the_model_commands_say_why_and_convert_still_runs(tmp_path, monkeypatch, capsys):
    """Forge's Python has no `ldm` and no repositories/ folder: without the extension's private
    `ldm` (install.py's), fuse, train and demo refuse at once with what to do (exit 2, nothing
    written); convert, which needs no model, is not refused."""
    import importlib.util

    from lib_mos.cli import main as cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, package=None: None if name == "ldm" else find_spec(name, package))
    monkeypatch.setattr(cli, "webui_candidates", lambda: [tmp_path / "forge"])
    monkeypatch.setattr(cli, "PRIVATE_LDM", tmp_path / "forge" / "extensions" / "mos" / ".mos-ldm")
    out = tmp_path / "fused.safetensors"
    assert cli.main(["fuse", "--base", str(tmp_path / "base.safetensors"), "--out", str(out),
                     "--concept", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "`fuse` builds the model with the `ldm` package" in err and "In Forge, restart it once" in err
    assert str(tmp_path / "forge") in err and not out.exists()
    assert cli.main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) != 0
    err = capsys.readouterr().err  # refused for its own reason (the missing file), not for ldm
    assert "concept file not found" in err and "`ldm` package" not in err


def test_the_private_ldm_is_found_in_the_extensions_folder(tmp_path, monkeypatch):
    """In Forge, install.py puts `ldm` into the extension's `.mos-ldm`; the CLI puts it on its path."""
    import importlib.util

    from lib_mos.cli import main as cli

    private = _fake_webui(tmp_path) / "repositories" / "stable-diffusion-stability-ai"  # any folder with ldm/modules
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, package=None: None if name == "ldm" else find_spec(name, package))
    monkeypatch.setattr(cli, "webui_candidates", lambda: [tmp_path / "forge"])
    monkeypatch.setattr(cli, "PRIVATE_LDM", private)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert cli.use_webui_packages() == private and sys.path[0] == str(private)
