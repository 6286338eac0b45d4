"""The fusion tab inside the host double, as the host's Checkpoint Merger behaves: it fuses in a
child process under the queue, with a task id the host's progress API reports on, saves into the
checkpoint folder and refreshes the list, leaves the live model bit-identical, stops at once on
Interrupt, reports errors as one message, and never leaves a file behind when it fails."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
import torch
from browser import pick_option
from test_binding import make_concept
from test_cli_trigger_words import tag_frequency, write_kohya_lora

from lib_mos.concepts.files import write_concept
from lib_mos.fusion import checkpoint as fused_checkpoint
from lib_mos.models import sd1

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tab(tmp_path, tiny_checkpoint):
    from host_harness import HostHarness

    from modules import shared

    harness = HostHarness(tmp_path, tiny_checkpoint, extensions=[str(ROOT)])
    model = sd1.load_checkpoint(tiny_checkpoint)
    for k, tokens in enumerate((("<cat1>", "<cat2>"), ("<dog1>", "<dog2>"))):
        c = dataclasses.replace(make_concept(model, tokens, seed=k + 1), name=tokens[0][1:-1])
        write_concept(c, Path(shared.cmd_opts.lora_dir) / f"{c.name}.safetensors")
    spec = importlib.util.spec_from_file_location("mos_fusion_tab_under_test", ROOT / "scripts" / "mos_fusion_tab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.CHECK_STEPS = 0  # the plumbing tests; the verdict's lines are tested with the check on, once
    try:
        yield harness, module
    finally:
        harness.close()


def live_state(harness) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in harness.model.state_dict().items()}


def fuse_args(harness, module, **overrides):
    from modules import shared

    table = module.concept_table(module.concept_choices())
    args = dict(id_task="task(test)", base_title=shared.opts.sd_model_checkpoint, table=table,
                stages=["text encoder", "cross-attention k/v"], solver="exact", spatial_steps=1, spatial_size=256,
                spatial_seeds=2,
                seed=0, dtype="fp16", name="fused-pets", overwrite=False)
    args.update(overrides)
    return list(args.values())


def test_tab_is_registered(tab):
    harness, _ = tab
    assert ("Mix-of-Show fusion", "mos_fusion") in [(t, e) for _, t, e in harness.ui_tabs]


def test_settings_that_cannot_determine_the_widest_layers_are_flagged_before_fusing(tab):
    """SD1.5's middle block (1280 inputs) sees (size/64)^2 cells per step and seed, 4 seeds."""
    _, module = tab
    assert module.settings_note(20, 512) == "" and module.settings_note(20, 256) == ""
    note = module.settings_note(1, 256)
    assert "mos-warning" in note and "64 rows" in note and "1280 inputs" in note and "at least 20 steps" in note
    assert "at least 5 steps" in module.settings_note(4, 512)
    assert "at least 80 steps" in module.settings_note(4, 256, 1) and module.settings_note(20, 512, 1) == ""


def test_the_sdxl_base_gets_sdxl_settings_notes_and_the_child_a_budget_beside_the_webui(tab, tmp_path, monkeypatch):
    """With an SDXL base picked, the note reads SDXL's widest layers (1280 inputs at level 2 of
    three: (size/32)^2 cells); the child's budget is 8 GB or 85 % of the memory available now."""
    from lib_mos.models import sdxl

    _, module = tab
    path = sdxl.save_checkpoint(sdxl.build_tiny_sdxl(0), tmp_path / "xl.safetensors")

    class Info:
        filename = str(path)

    monkeypatch.setattr(module.sd_models, "get_closet_checkpoint_match", lambda title: Info())
    note = module.settings_note(1, 256, 1, "xl.safetensors")
    assert "64 rows" in note and "input_blocks.7.1" in note and "1280 inputs" in note, note
    assert "middle_block" in module.settings_note(1, 256, 1)  # SD1.5's: no base given
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
    assert module.memory_budget_gb() == pytest.approx(min(8.0, 0.85 * available), abs=0.3)


def test_concept_table_names_its_columns_with_no_rows_and_skips_empty_rows(tab):
    """Gradio 3.41's page takes a table's headers from its value, and a value that is a list with no
    rows carries none: on a fresh page the real WebUI headed the columns "0 1 2 3 4" until a file was
    picked, and again when every file was deselected. The tab's values always name them; rows the
    page sends empty (its "New row", a fresh table) are never concepts."""
    harness, module = tab
    blocks = next(b for b, _, elem_id in harness.ui_tabs if elem_id == "mos_fusion")
    table = next(c for c in blocks.blocks.values() if getattr(c, "elem_id", None) == "mos_fusion_table")
    assert table.postprocess([])["headers"] == []  # gradio's behaviour behind it
    first = table.get_config()["value"]  # what the page is built with
    assert first == {"headers": module.TABLE_HEADERS, "data": []}
    for selected in ([], ["cat1.safetensors"], []):
        sent = table.postprocess(module.concept_table_value(selected, table.preprocess(first)))
        assert sent["headers"] == module.TABLE_HEADERS and [r[0] for r in sent["data"]] == selected

    page_value = {"headers": module.TABLE_HEADERS, "data": [["", "", "", "", ""], ["dog1.safetensors", "", "", 1, 1],
                                                            [None, None, None, None, None]]}
    current = table.preprocess(page_value)
    assert [r[0] for r in module.concept_table(["cat1.safetensors", "dog1.safetensors"], current)] == [
        "cat1.safetensors", "dog1.safetensors"]
    args = module._concept_args(current)
    assert len(args) == 2 and args[1].endswith("dog1.safetensors@1,1")
    assert module._concept_args(table.preprocess(first)) == []


def test_base_defaults_to_the_checkpoint_the_top_dropdown_shows(tab, tmp_path):
    """After a generation with a checkpoint override the host restores the setting (the top
    dropdown) but leaves the override's weights loaded until the next generation; the base is the
    one the user sees, which the next generation loads too (found in the real host)."""
    from modules import sd_models, shared

    harness, module = tab
    sd1.save_checkpoint(sd1.build_tiny_sd1(seed=1), Path(sd_models.model_path) / "other.safetensors")
    sd_models.list_models()
    shown = shared.opts.sd_model_checkpoint
    harness.txt2img("a cat", steps=1, override_settings={"sd_model_checkpoint": "other"})
    assert shared.opts.sd_model_checkpoint == shown and harness.model.sd_checkpoint_info.name_for_extra == "other"
    assert module.loaded_checkpoint() == shown
    shared.opts.sd_model_checkpoint = "gone.safetensors"  # a setting naming no file: the weights loaded now
    assert module.loaded_checkpoint() == harness.model.sd_checkpoint_info.title


def run_job(module, *args):
    from modules import call_queue

    return call_queue.wrap_gradio_gpu_call(module.run_fusion, extra_outputs=[None, None])(*args)


def checkpoint_folder_files() -> list[str]:
    from modules import sd_models

    return sorted(p.name for p in Path(sd_models.model_path).iterdir())


def test_tab_fuses_in_a_child_with_progress_and_refreshes(tab):
    """The host's progress API sees the task (active, progress, the stage in its text) while the
    child works, and the result and the refreshed list come back."""
    from modules import progress, sd_models

    harness, module = tab
    assert module.concept_choices() == ["cat1.safetensors", "dog1.safetensors"]
    before = live_state(harness)
    seen = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            answer = progress.progressapi(progress.ProgressRequest(id_task="task(test)"))
            if answer.active and answer.progress:
                seen.append((answer.progress, answer.textinfo))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        module.CHECK_STEPS = 2
        report, update, status = run_job(module, *fuse_args(harness, module, spatial_steps=1))
    finally:
        done.set()
        watcher.join()
    assert report["headers"] == module.REPORT_HEADERS
    rows = report["data"]
    assert "Saved" in status and "Time taken" in status, status
    used = re.search(r"memory ([\d.]+) GiB at most \(budget ([\d.]+) GiB\)", status)  # the child's own peak
    assert used and 0 < float(used[1]) <= float(used[2]), status
    assert status.count("what it draws, error against its own model") == 2, status  # the verdict per concept
    assert [r[1] for r in rows].count("picture") == 2
    assert "fused-pets.safetensors" in checkpoint_folder_files()
    assert any(t.startswith("fused-pets.safetensors") for t in sd_models.checkpoint_tiles())
    assert any(t.startswith("fused-pets.safetensors") for t in update["choices"])
    layers = [r for r in rows if r[1] != "picture"]
    assert len(layers) == 4 and all(r[3] < r[4] for r in layers)  # fused beats averaging in every layer stage
    assert all(r[5] is not None for r in layers)  # held-out errors measured
    assert seen and all(0 < p <= 1 for p, _ in seen) and any("te" in text for _, text in seen)
    assert "task(test)" in progress.finished_tasks
    after = live_state(harness)
    assert all(torch.equal(before[k], after[k]) for k in before)
    out = Path(sd_models.model_path) / "fused-pets.safetensors"
    assert [c.tokens for c in fused_checkpoint.read_fused_concepts(out)] == [("<cat1>", "<cat2>"), ("<dog1>", "<dog2>")]


def test_tab_weights_renamed_tokens_and_settings_reach_the_child(tab):
    from modules import sd_models

    harness, module = tab
    table = module.concept_table(module.concept_choices())
    table[1][1] = "<pup1>+<pup2>"
    table[1][3], table[1][4] = 0.5, 0.25
    *_, status = run_job(module, *fuse_args(harness, module, table=table, spatial_steps=3, spatial_seeds=3))
    assert "Saved" in status, status
    import json

    from safetensors import safe_open

    with safe_open(str(Path(sd_models.model_path) / "fused-pets.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()[fused_checkpoint.FUSED_METADATA_KEY])
    assert [c["tokens"] for c in meta["concepts"]] == [["<cat1>", "<cat2>"], ["<pup1>", "<pup2>"]]
    assert [(c["unet_weight"], c["text_weight"]) for c in meta["concepts"]] == [(1.0, 1.0), (0.5, 0.25)]
    assert (meta["settings"]["spatial_steps"], meta["settings"]["spatial_seeds"]) == (3, 3)


def test_an_earlier_selections_table_finishing_last_changes_nothing(tab):
    """The page stamps each table request; one that a newer request from the same page overtook
    (the host runs them concurrently) answers with no change, so the newest selection's table
    stays (the table is asked for on each change and when the list closes)."""
    _, module = tab
    both = module.concept_choices()
    assert len(both) == 2
    release, entered = threading.Event(), threading.Event()
    original = module.concept_row
    answers: dict[str, object] = {}

    def slow_row(rel):  # the first request reads its file slowly
        if threading.current_thread().name == "first":
            entered.set()
            release.wait(30)
        return original(rel)

    module.concept_row = slow_row
    try:
        first = threading.Thread(name="first", target=lambda: answers.__setitem__(
            "first", module.table_for_selection(both[:1], None, "page1:1")))
        first.start()
        entered.wait(30)
        answers["second"] = module.table_for_selection(both, None, "page1:2")
        release.set()
        first.join(30)
        answers["other page"] = module.table_for_selection(both[:1], None, "page2:1")
    finally:
        module.concept_row = original
    assert [r[0] for r in answers["second"]["data"]] == both
    assert answers["first"] == gr.update()  # overtaken: no change
    assert [r[0] for r in answers["other page"]["data"]] == both[:1]  # another page counts on its own
    assert [r[0] for r in module.table_for_selection(both, None, "")["data"]] == both  # no stamp: answered


def test_run_reconciles_a_stale_table_with_the_selection(tab):
    """Selecting two files quickly sends two table updates that the host may finish out of order;
    the run fuses what is selected, keeping the edits of rows still selected."""
    from modules import sd_models

    harness, module = tab
    stale = module.concept_table(["dog1.safetensors"])
    stale[0][3] = 0.5
    *_, status = run_job(module, *fuse_args(harness, module, table=stale),
                         ["cat1.safetensors", "dog1.safetensors"])
    assert "Saved" in status, status
    concepts = fused_checkpoint.read_fused_concepts(Path(sd_models.model_path) / "fused-pets.safetensors")
    assert [c.tokens for c in concepts] == [("<cat1>", "<cat2>"), ("<dog1>", "<dog2>")]


def test_tab_refuses_clashes_with_one_message(tab):
    harness, module = tab
    table = module.concept_table(module.concept_choices())
    table[1][1] = "<cat1>+<pup>"
    *_, status = run_job(module, *fuse_args(harness, module, table=table))
    assert "error" in status and "&lt;cat1&gt;" in status and "Traceback" not in status
    assert checkpoint_folder_files() == ["tiny-sd1.safetensors"]


def test_interrupt_stops_the_child_and_leaves_nothing(tab):
    from modules import shared

    harness, module = tab
    result = []
    job = threading.Thread(target=lambda: result.append(run_job(module, *fuse_args(harness, module))))
    job.start()
    deadline = time.monotonic() + 120
    while not shared.state.textinfo and time.monotonic() < deadline:  # the child reports its first step
        time.sleep(0.05)
    module.interrupt()
    job.join(120)
    assert not job.is_alive()
    *_, status = result[0]
    assert "Interrupted" in status and "nothing was written" in status
    assert checkpoint_folder_files() == ["tiny-sd1.safetensors"]  # no temporary file either
    assert not shared.state.interrupted  # the host resets the flag after the job


def test_tab_bad_output_name(tab):
    harness, module = tab
    *_, status = run_job(module, *fuse_args(harness, module, name="../escape"))
    assert "error" in status and "without folders" in status


def write_loras(folder: Path) -> None:
    """Ordinary LoRAs (kohya keys, none of our metadata): trigger words from the host's sidecar
    json, from the training tags (in a subfolder), from nowhere, and a broken sidecar json."""
    write_kohya_lora(folder / "hero.safetensors", activation_text="ohwx man", metadata=tag_frequency(a={"man": 9}))
    (folder / "styles").mkdir()
    write_kohya_lora(folder / "styles" / "ink.safetensors", seed=4,
                     metadata=tag_frequency(**{"10_ink": {"ink style": 4, "1girl": 2}, "1_reg": {"1girl": 1}}))
    write_kohya_lora(folder / "bare.safetensors", seed=5)
    write_kohya_lora(folder / "broken.safetensors", seed=6)
    (folder / "broken.json").write_text("{not json")
    (folder / "notes.txt").write_text("not a LoRA")


def test_tab_lists_every_lora_with_its_trigger_words(tab):
    """Kohya files without our metadata are listed; the table shows a LoRA's trigger words and
    where they came from, and a file without any says so in its row instead of failing."""
    from modules import shared

    _, module = tab
    write_loras(Path(shared.cmd_opts.lora_dir))
    choices = module.concept_choices()
    assert choices == ["bare.safetensors", "broken.safetensors", "cat1.safetensors", "dog1.safetensors",
                       "hero.safetensors", "styles/ink.safetensors"]
    assert module.folder_problems() == ""
    rows = {r[0]: r for r in module.concept_table(choices)}
    assert rows["hero.safetensors"][1:] == ["(no tokens: trigger words from activation text of hero.json)",
                                            "ohwx man", 1.0, 1.0]
    assert rows["styles/ink.safetensors"][1:3] == [
        "(no tokens: trigger words from most frequent training tag (4 times in ss_tag_frequency))", "ink style"]
    assert rows["cat1.safetensors"][1:3] == ["<cat1>+<cat2>", ""]
    assert rows["bare.safetensors"][1:3] == [module.NO_TRIGGER_WORDS, ""]
    broken = rows["broken.safetensors"][1]
    assert broken.startswith(module.NO_TRIGGER_WORDS[:-1]) and "broken.json" in broken and "cannot be read" in broken
    assert str(shared.cmd_opts.lora_dir) not in broken


def run_captured(module, monkeypatch, harness, table, files=None) -> tuple[list[list[str]], str]:
    """Runs the tab's job with the child replaced: the `--concept` specs it would get, and the status."""
    calls = []

    def child(args, out, **kwargs):
        calls.append(list(args))
        return {"path": str(out), "report": [], "warnings": [], "seconds": {}, "notes": []}

    monkeypatch.setattr(module, "run_fusion_process", child)
    *_, status = run_job(module, *fuse_args(harness, module, table=table), *([files] if files else []))
    specs = [[a[i + 1] for i, arg in enumerate(a) if arg == "--concept"] for a in calls]
    return specs, status


def test_edited_trigger_words_reach_the_child(tab, monkeypatch):
    from modules import shared

    harness, module = tab
    folder = Path(shared.cmd_opts.lora_dir)
    write_loras(folder)
    files = ["cat1.safetensors", "hero.safetensors", "styles/ink.safetensors"]
    table = module.concept_table(files)
    table[1][2] = " sks person, red coat "
    table[1][3] = 0.5
    specs, status = run_captured(module, monkeypatch, harness, table, files)
    assert "Saved" in status, status
    parsed = [fused_checkpoint.parse_concept_spec(s) for s in specs[0]]
    assert [(Path(s.path).relative_to(folder).as_posix(), s.tokens, s.trigger, s.unet_weight) for s in parsed] == [
        ("cat1.safetensors", ("<cat1>", "<cat2>"), None, 1.0), ("hero.safetensors", None, "sks person, red coat", 0.5),
        ("styles/ink.safetensors", None, "ink style", 1.0)]

    # a LoRA without words is refused before the child starts, naming it; typed words are used
    table = module.concept_table(["bare.safetensors"])
    specs, status = run_captured(module, monkeypatch, harness, table)
    assert specs == [] and "error" in status and "bare.safetensors" in status and "trigger words" in status
    table[0][2] = "zwx cat"
    specs, status = run_captured(module, monkeypatch, harness, table)
    assert "Saved" in status and fused_checkpoint.parse_concept_spec(specs[0][0]).trigger == "zwx cat"


def test_tab_fuses_a_kohya_lora_by_its_edited_trigger_words(tab):
    """Through the real child: the edited words are the ones it uses (its note, shown in the
    status), and trigger words typed on a concept with tokens are refused naming the file."""
    from modules import sd_models, shared

    harness, module = tab
    write_loras(Path(shared.cmd_opts.lora_dir))
    table = module.concept_table(["cat1.safetensors", "hero.safetensors"])
    table[1][2] = "sks person"
    report, _, status = run_job(module, *fuse_args(harness, module, table=table, stages=["text encoder"]))
    rows = report["data"]
    assert "Saved" in status, status
    assert "<p>hero.safetensors: trigger words &quot;sks person&quot; as given</p>" in status
    assert {r[0] for r in rows} == {"cat1", "hero"}
    assert "fused-pets.safetensors" in checkpoint_folder_files()
    (Path(sd_models.model_path) / "fused-pets.safetensors").unlink()

    table[0][2] = "ohwx cat"
    *_, status = run_job(module, *fuse_args(harness, module, table=table))
    assert "error" in status and "cat1.safetensors" in status and "trigger words" in status, status
    assert checkpoint_folder_files() == ["tiny-sd1.safetensors"]


TABLE_HEADERS = ["concept file", "tokens (rename as <a>+<b>)", "trigger words (LoRAs without tokens)",
                 "UNet weight", "text weight"]


def table_headers(page) -> list[str]:
    """The concept table's column headers as the page shows them."""
    return [t.strip() for t in page.locator("#mos_fusion_table thead th").all_inner_texts()]


def test_page_defaults_to_the_loaded_checkpoint_shows_progress_and_interrupts(tmp_path, tiny_checkpoint, browser_page):
    """A stale base in ui-config.json is not used; Fuse shows the host's progress bar; Interrupt,
    enabled only while the fusion runs, stops it and nothing is written."""
    import json

    from host_harness import HostHarness

    from modules import sd_models, shared

    config = tmp_path / "ui-config.json"
    config.write_text(json.dumps({"mos_fusion/Base checkpoint (default: the one loaded now)/value": "stale.safetensors"}))
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ROOT)], ui_config_file=config)
    try:
        model = sd1.load_checkpoint(tiny_checkpoint)
        for k, tokens in enumerate((("<cat1>", "<cat2>"), ("<dog1>", "<dog2>"))):
            c = dataclasses.replace(make_concept(model, tokens, seed=k + 1), name=tokens[0][1:-1])
            write_concept(c, Path(shared.cmd_opts.lora_dir) / f"{c.name}.safetensors")
        page = browser_page.page
        page.goto(harness.serve())
        page.click("#tabs > .tab-nav > button:has-text('Mix-of-Show fusion')")
        assert table_headers(page) == TABLE_HEADERS  # before any file is picked, not "0 1 2 3 4"
        assert page.locator("#mos_fusion_table tbody tr").count() == 0
        assert page.input_value("#mos_fusion_base input") == shared.opts.sd_model_checkpoint
        assert page.inner_text("#mos_fusion_settings_note").strip() == ""  # the defaults are enough
        page.fill("#mos_fusion_spatial_steps input[type=number]", "1")
        page.press("#mos_fusion_spatial_steps input[type=number]", "Tab")  # gradio reads the number on blur
        page.wait_for_function("() => /at least \\d+ steps/.test("
                               "gradioApp().querySelector('#mos_fusion_settings_note').textContent)")
        page.click("#mos_fusion_refresh")  # the files were written after the page was built
        for name in ("cat1.safetensors", "dog1.safetensors"):  # the new choices may still be on their way
            pick_option(page, "mos_fusion_files", name)
        page.mouse.click(2, 2)
        page.wait_for_function("() => gradioApp().querySelectorAll('#mos_fusion_table tbody tr').length >= 2",
                               timeout=60_000)
        assert table_headers(page) == TABLE_HEADERS
        assert page.is_disabled("#mos_fusion_interrupt")  # nothing to interrupt yet
        page.click("#mos_fusion_run")
        page.wait_for_selector(".progressDiv", timeout=60_000)
        page.wait_for_function("() => /mos|te|kv/.test(gradioApp().querySelector('.progressDiv').textContent)",
                               timeout=60_000)
        page.click("#mos_fusion_interrupt")
        page.wait_for_function("() => /Interrupted/.test(gradioApp().querySelector('#mos_fusion_status').textContent)",
                               timeout=120_000)
        assert sorted(p.name for p in Path(sd_models.model_path).iterdir()) == ["tiny-sd1.safetensors"]
        page.wait_for_function("gradioApp().querySelector('#mos_fusion_interrupt').disabled", timeout=30_000)
        page.click("#mos_fusion_files .remove-all")  # every file deselected: no rows, the same headers
        page.wait_for_function("() => !Array.from(gradioApp().querySelectorAll('#mos_fusion_table tbody tr'))"
                               ".some(row => row.textContent.includes('.safetensors'))", timeout=60_000)
        assert table_headers(page) == TABLE_HEADERS
        assert page.locator("#mos_fusion_table tbody tr").count() == 0
        harness.wait_idle()
        assert not browser_page.errors, browser_page.errors
    finally:
        harness.close()
