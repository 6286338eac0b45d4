"""`python -m lib_mos train` as users run it: a concept from a folder, one clear line and no file for
bad data, and Ctrl-C that stops at a step boundary leaving the last complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_training import write_discs

from lib_mos.concepts.concept import ConceptError
from lib_mos.concepts.files import read_concept
from lib_mos.training.trainer import state_path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "lib_mos", "train", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def common(base: Path, images: Path, out: Path, steps: int) -> list[str]:
    return ["--base", str(base), "--images", str(images), "--out", str(out), "--class-word", "ball", "--steps",
            str(steps), "--resolution", "64", "--batch-size", "2", "--views-per-image", "2", "--templates", "object"]


def test_train_writes_a_concept(tiny_checkpoint, tmp_path):
    out = tmp_path / "disc.safetensors"
    proc = cli(*common(tiny_checkpoint, write_discs(tmp_path / "imgs", 2), out, 3), "--sample-every", "3",
               "--sample-prompt", "a photo of <TOK>", "--sample-steps", "2")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "linear preview codec" in stdout and f"wrote {out}" in stdout
    assert "train: steps |" in stderr and "3/3" in stderr  # the progress bar
    concept = read_concept(out)
    assert concept.tokens == ("<disc1>", "<disc2>") and concept.class_word == "ball"
    assert (tmp_path / "disc-samples" / "step000003-0.png").is_file()
    assert not state_path(out).exists()


def test_bad_data_is_one_line_and_no_file(tiny_checkpoint, tmp_path):
    images = write_discs(tmp_path / "imgs", 2)
    (images / "disc1.txt").write_text("a red sphere")  # neither <TOK> nor the class word
    out = tmp_path / "disc.safetensors"
    proc = cli(*common(tiny_checkpoint, images, out, 3))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "disc1.txt" in lines[0], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_ctrl_c_leaves_the_last_complete_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "disc.safetensors"
    proc = cli(*common(tiny_checkpoint, write_discs(tmp_path / "imgs", 2), out, 500), "--save-every", "2")
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "checkpoint at step" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert "checkpoint at step 2" in line, line
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted after step" in stderr and "--resume" in stderr
    assert read_concept(out).tokens == ("<disc1>", "<disc2>") and state_path(out).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disc.safetensors", "disc.safetensors.train-state", "imgs"]


def test_every_commands_help_names_its_defaults(capsys):
    """`--help` of train, fuse, convert, demo and the toy world's commands shows each option's
    default, also for options without help text; flags and options without one say nothing."""
    import pytest

    from lib_mos.cli.main import main
    from lib_mos.toyworld.__main__ import main as toyworld_main
    from lib_mos.training.trainer import TrainSettings

    def help_of(run, *argv: str) -> str:
        with pytest.raises(SystemExit):
            run([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())  # one line, wrapping undone

    train = help_of(main, "train")
    assert f"--steps STEPS default: {TrainSettings().steps}" in train
    assert f"--resolution RESOLUTION default: {TrainSettings().resolution}" in train
    assert "(default: human)" in train and "--device DEVICE default: cpu" in train
    assert "--overwrite replace --out if it exists" in train and "exists (default" not in train  # a flag
    assert "default: None" not in train and "default: False" not in train
    fuse = help_of(main, "fuse")
    assert "--solver {exact,lbfgs} default: exact" in fuse and "--spatial-size SPATIAL_SIZE default: 512" in fuse
    assert "(default 8)" in fuse and "default: 8.0" not in fuse  # help that says its default is left alone
    assert "--family {auto,sd1,sdxl}" in help_of(main, "convert")
    assert "--seed SEED default: 0" in help_of(main, "demo")
    assert "--steps STEPS default: 1000" in help_of(toyworld_main, "train-probes")


def test_train_on_an_sdxl_checkpoint_writes_an_sdxl_concept(tiny_sdxl_checkpoint, tmp_path):
    """The family comes from the checkpoint: 70 rows per token, CLIP-L's and bigG's parts, a file
    that says "sdxl" and binds on the same model."""
    from lib_mos.concepts import binding
    from lib_mos.models import sdxl
    from lib_mos.models.family import SDXL

    out = tmp_path / "disc.safetensors"
    proc = cli(*common(tiny_sdxl_checkpoint, write_discs(tmp_path / "imgs", 2), out, 2), "--sample-every", "2",
               "--sample-prompt", "a photo of <TOK>", "--sample-steps", "2")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "SDXL" in stdout and "gradient checkpointing on" in stdout and f"wrote {out}" in stdout
    concept = read_concept(out, family=SDXL)
    assert concept.embeddings.shape == (2, 70, 80) and concept.class_word == "ball"
    assert (tmp_path / "disc-samples" / "step000002-0.png").is_file()
    model = sdxl.load_checkpoint(tiny_sdxl_checkpoint)
    assert binding.PromptBinder(model, [concept]).conditioning(["a <disc1> <disc2>"], 64, 64)["vector"].shape == (1, 96)
    with pytest.raises(ConceptError, match=r"for SDXL; this is an SD1\.x model"):
        read_concept(out)
