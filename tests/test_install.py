"""install.py: quick when nothing is missing, installs exactly what is missing."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake_launch(tmp_path: Path, missing: set[str]) -> Path:
    """A `launch` module like the host's: is_installed by distribution metadata, run_pip logged."""
    folder = tmp_path / "webui"
    folder.mkdir()
    (folder / "launch.py").write_text(textwrap.dedent(f'''
        import importlib.metadata
        MISSING = {sorted(missing)!r}
        def is_installed(package):
            if package in MISSING:
                return False
            try:
                importlib.metadata.distribution(package)
                return True
            except importlib.metadata.PackageNotFoundError:
                return False
        def run_pip(command, desc=None, live=False):
            with open({str(tmp_path / "pip.log")!r}, "a") as f:
                f.write(command + "\\n")
    '''))
    return folder


def _run(tmp_path: Path, missing: set[str]) -> str:
    webui = _fake_launch(tmp_path, missing)
    proc = subprocess.run([sys.executable, str(ROOT / "install.py")], env={"PYTHONPATH": str(webui)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "pip.log"
    return log.read_text() if log.exists() else ""


def test_nothing_missing_installs_nothing_and_imports_nothing_heavy(tmp_path):
    """The host runs install.py at every launch: with everything present it only reads package
    metadata (no torch, gradio, transformers... imported)."""
    log = _run(tmp_path, set())
    assert log == ""
    webui = tmp_path / "webui"  # the fake host `_run` made
    probe = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__'); "
             "print(sorted(m for m in ('torch', 'gradio', 'transformers', 'safetensors', 'numpy', 'PIL') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe, str(ROOT / "install.py")], env={"PYTHONPATH": str(webui)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_requirement_is_installed(tmp_path):
    log = _run(tmp_path, {"safetensors"})
    assert log.splitlines() == ['install "safetensors"']


def test_every_requirement_is_in_the_test_stack():
    sys.path.insert(0, str(ROOT))
    import install

    for name, _ in install.required_packages():
        importlib.metadata.distribution(name)  # raises if the pinned stack lacks it


def test_in_forge_the_private_ldm_goes_into_the_extensions_folder(tmp_path):
    """Forge has no `ldm`: install.py installs it with --target into the extension's own folder
    (never the host's venv), once; in A1111 (above) nothing."""
    webui = _fake_launch(tmp_path, set())
    for package in ("modules_forge", "backend"):  # Forge's markers, as the host's PYTHONPATH shows them
        (webui / package).mkdir()
        (webui / package / "__init__.py").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "install.py")], env={"PYTHONPATH": str(webui)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "pip.log").read_text().splitlines()
    assert log == [f'install --no-deps --target "{ROOT / ".mos-ldm"}" "stable-diffusion-sdkit==2.1.5"']
