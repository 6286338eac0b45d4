"""The fusion tab inside the host double: it appears, fuses under the queue with progress, saves
into the checkpoint folder, refreshes the list, leaves the live model bit-identical, and reports
errors and interrupts without writing anything."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from test_binding import make_concept

from lib_mos import fusion
from lib_mos.concept_files import write_concept

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tab(tmp_path, tiny_checkpoint):
    from host_harness import HostHarness

    from modules import shared

    harness = HostHarness(tmp_path, tiny_checkpoint, extensions=[str(ROOT)])
    from lib_mos import sd1

    model = sd1.load_checkpoint(tiny_checkpoint)
    for k, tokens in enumerate((("<cat1>", "<cat2>"), ("<dog1>", "<dog2>"))):
        c = dataclasses.replace(make_concept(model, tokens, seed=k + 1), name=tokens[0][1:-1])
        write_concept(c, Path(shared.cmd_opts.lora_dir) / f"{c.name}.safetensors")
    spec = importlib.util.spec_from_file_location("mos_fusion_tab_under_test", ROOT / "scripts" / "mos_fusion_tab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        yield harness, module
    finally:
        harness.close()


def live_state(harness) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in harness.model.state_dict().items()}


def fuse_args(harness, module, **overrides):
    from modules import shared

    table = module.concept_table(module.concept_choices())
    args = dict(base_title=shared.opts.sd_model_checkpoint, table=table, stages=list(module.STAGE_LABELS),
                solver="exact", spatial_steps=2, spatial_size=64, seed=0, dtype="fp16", name="fused-pets",
                overwrite=False)
    args.update(overrides)
    return list(args.values())


def test_tab_is_registered(tab):
    harness, _ = tab
    assert ("Mix-of-Show fusion", "mos_fusion") in [(t, e) for _, t, e in harness.ui_tabs]


def test_tab_fuses_saves_and_refreshes(tab):
    from modules import call_queue, sd_models, shared

    harness, module = tab
    assert module.concept_choices() == ["cat1.safetensors", "dog1.safetensors"]
    table = module.concept_table(module.concept_choices())
    assert table[0][1] == "<cat1>+<cat2>"
    before = live_state(harness)
    seen = []
    original = module.fusion.fuse_checkpoint

    def spy(*a, progress=None, **k):
        def wrapped(what, done, total):
            seen.append((shared.state.job, what))
            progress(what, done, total)

        return original(*a, progress=wrapped, **k)

    module.fusion.fuse_checkpoint = spy
    try:
        job = call_queue.wrap_gradio_gpu_call(module.run_fusion, extra_outputs=[None, None])
        rows, update, status = job(*fuse_args(harness, module))
    finally:
        module.fusion.fuse_checkpoint = original
    assert "Saved" in status and "Time taken" in status
    out = Path(sd_models.model_path) / "fused-pets.safetensors"
    assert out.is_file()
    assert any(t.startswith("fused-pets.safetensors") for t in sd_models.checkpoint_tiles())
    assert any(t.startswith("fused-pets.safetensors") for t in update["choices"])
    assert len(rows) == 6 and all(r[3] < r[4] for r in rows)
    assert seen and all(job_name == module.TAB_TITLE for job_name, _ in seen)
    after = live_state(harness)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [c.tokens for c in fusion.read_fused_concepts(out)] == [("<cat1>", "<cat2>"), ("<dog1>", "<dog2>")]


def test_tab_renames_tokens_and_refuses_clashes(tab):
    from modules import call_queue

    harness, module = tab
    table = module.concept_table(module.concept_choices())
    table[1][1] = "<cat1>+<pup>"
    job = call_queue.wrap_gradio_gpu_call(module.run_fusion, extra_outputs=[None, None])
    *_, status = job(*fuse_args(harness, module, table=table, stages=["cross-attention k/v"]))
    assert "error" in status and "&lt;cat1&gt;" in status


def test_tab_interrupt_writes_nothing(tab):
    from modules import call_queue, sd_models, shared

    harness, module = tab
    original = module.fusion.fuse_checkpoint

    def interrupting(*a, progress=None, **k):
        def wrapped(what, done, total):
            shared.state.interrupted = True
            progress(what, done, total)

        return original(*a, progress=wrapped, **k)

    module.fusion.fuse_checkpoint = interrupting
    try:
        job = call_queue.wrap_gradio_gpu_call(module.run_fusion, extra_outputs=[None, None])
        *_, status = job(*fuse_args(harness, module))
    finally:
        module.fusion.fuse_checkpoint = original
    assert "Interrupted" in status
    assert not (Path(sd_models.model_path) / "fused-pets.safetensors").exists()
    assert not shared.state.interrupted  # the host resets the flag after the job
    assert [p.name for p in Path(sd_models.model_path).iterdir() if p.name.startswith(".")] == []


def test_tab_bad_output_name(tab):
    from modules import call_queue

    harness, module = tab
    job = call_queue.wrap_gradio_gpu_call(module.run_fusion, extra_outputs=[None, None])
    *_, status = job(*fuse_args(harness, module, name="../escape"))
    assert "error" in status and "without folders" in status
