"""Fusion in a child process (what the WebUI's tab runs): progress and the result come back, an
error is one clear message, an interrupt or a crash leaves no file and no temporary file."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from lib_mos.concepts import synthetic
from lib_mos.concepts.files import write_concept
from lib_mos.fusion.process import FusionProcessError, FusionProcessInterrupted, run_fusion_process
from lib_mos.models import sd1

ROOT = Path(__file__).resolve().parents[1]
# the spatial stage and the picture check (both sample at 512 px) are the tab's slow parts; the
# process plumbing is the same without them
QUICK = ["--skip-stage", "spatial", "--check-steps", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    folder = tmp_path_factory.mktemp("fusion-process")
    model = sd1.load_checkpoint(tiny_checkpoint)
    concepts = []
    for seed, name in enumerate(("cat", "dog"), start=1):
        concept = synthetic.random_concept(model, (f"<{name}1>", f"<{name}2>"), seed=seed, name=name)
        concepts.append(write_concept(concept, folder / f"{name}.safetensors"))
    return tiny_checkpoint, concepts


def args(files, *extra: str) -> list[str]:
    base, concepts = files
    out = ["--base", str(base), *QUICK, *extra]
    for c in concepts:
        out += ["--concept", str(c)]
    return out


def test_progress_and_result_come_back(files, tmp_path):
    seen = []
    out = tmp_path / "fused.safetensors"
    result = run_fusion_process(args(files), out, progress=lambda *a: seen.append(a), cwd=ROOT)
    assert out.is_file() and Path(result["path"]) == out
    assert {r["stage"] for r in result["report"]} == {"te", "kv"} and len(result["report"]) == 4
    assert seen and all(isinstance(what, str) and 0 < done <= total for what, done, total in seen)
    assert any(what.startswith("te") for what, _, _ in seen) and any(what.startswith("kv") for what, _, _ in seen)


def test_an_error_is_one_message_naming_the_file(files, tmp_path):
    out = tmp_path / "fused.safetensors"
    with pytest.raises(FusionProcessError) as exc:
        run_fusion_process([*args(files), "--concept", str(tmp_path / "missing.safetensors")], out, cwd=ROOT)
    assert "missing.safetensors" in str(exc.value) and "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_stops_the_child_and_writes_nothing(files, tmp_path):
    """Stopped mid-stage: no output, and the child's temporary statistics folder is gone too."""
    out, temp = tmp_path / "out" / "fused.safetensors", tmp_path / "temp"
    out.parent.mkdir()
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    calls = []
    with pytest.raises(FusionProcessInterrupted):
        run_fusion_process(args(files), out, progress=lambda *a: calls.append(a), should_stop=lambda: bool(calls),
                           cwd=ROOT, env=env)
    assert calls and list(out.parent.iterdir()) == []
    assert list(temp.iterdir()) == []


def test_a_killed_child_leaves_no_temporary_file(tmp_path):
    """A stand-in interpreter that starts writing the output as lib_mos.files does, then dies."""
    out = tmp_path / "fused.safetensors"
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import os, signal, sys\n"
                    "out = sys.argv[sys.argv.index('--out') + 1]\n"
                    "folder, name = os.path.split(out)\n"
                    "open(os.path.join(folder, f'.{name}.{os.getpid()}.abcd.tmp'), 'wb').write(b'half')\n"
                    "os.kill(os.getpid(), signal.SIGKILL)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(FusionProcessError, match="killed"):
        run_fusion_process(["--base", "x"], out, python=str(fake), cwd=ROOT, env=dict(os.environ))
    assert [p.name for p in tmp_path.iterdir()] == ["python"]
