"""The training tab inside the host double: it trains on the loaded model under the queue with the
host's progress and live previews, writes a concept into the Lora folder that the Lora list, the
regional script and the fusion tab find at once, leaves the loaded model bit-identical (after a
run, an interrupt and an error), trains on the checkpoint's own weights when a Lora was left merged,
and refuses a generation that bypasses the queue while it trains."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from test_host_ui import handlers, outputs_by_id

from lib_mos.concepts.files import read_concept

ROOT = Path(__file__).resolve().parents[1]
# SKIPMARK


def _tab_on(tmp_path: Path, checkpoint: Path):
    """(the host double with `checkpoint` loaded, the tab's module), closed after the test."""
    from host_harness import HostHarness

    harness = HostHarness(tmp_path / "data", checkpoint, extensions=[str(ROOT)])
    spec = importlib.util.spec_from_file_location("mos_training_tab_under_test", ROOT / "scripts" / "mos_training_tab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        yield harness, module
    finally:
        harness.close()


@pytest.fixture
def tab(tmp_path, tiny_checkpoint):
    yield from _tab_on(tmp_path, tiny_checkpoint)


@pytest.fixture
def images(tmp_path) -> Path:
    """Three 64x64 pictures of a red disc on different backgrounds."""
    folder = tmp_path / "images"
    folder.mkdir()
    for k, background in enumerate(((20, 40, 200), (30, 160, 60), (200, 200, 200))):
        img = Image.new("RGB", (64, 64), background)
        ImageDraw.Draw(img).ellipse((12 + 4 * k, 14, 48 + 4 * k, 50), fill=(220, 30, 30))
        img.save(folder / f"disc{k}.png")
    return folder


def model_hash(model: torch.nn.Module) -> str:
    """Every parameter and buffer of the loaded model, names, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lora_files() -> list[str]:
    from modules import shared

    return sorted(p.name for p in Path(shared.cmd_opts.lora_dir).iterdir())


def job_args(folder: Path, **overrides) -> list:
    args = dict(id_task="task(train)", folder=str(folder), name="disc", kind_label="ED-LoRA (concept tokens)",
                tokens="<disc1>+<disc2>", class_word="ball", trigger="", steps=6, batch_size=2, resolution=64,
                lr_embedding=1e-2, lr_text=1e-4, lr_unet=1e-2, rank=2, seed=0, masked_loss=True, attn_reg_weight=0.0,
                templates="object", precision="fp32", gradient_checkpointing=False, save_every=0, sample_every=0,
                sample_prompt="a photo of <TOK>", overwrite=False, resume=False)
    args.update(overrides)
    return list(args.values())


def run_job(module, *args):
    from modules import call_queue

    return call_queue.wrap_gradio_gpu_call(module.run_training, extra_outputs=[None])(*args)


@pytest.fixture
def at_step(monkeypatch):
    """`at_step[k] = fn`: fn() runs in the trainer's progress callback after step k."""
    import lib_mos.training.trainer as training

    actions: dict = {}
    real = training.train

    def train(*args, progress=None, **kwargs):
        def spy(p):
            if progress is not None:
                progress(p)
            if p.step in actions:
                actions[p.step]()

        return real(*args, progress=spy, **kwargs)

    monkeypatch.setattr(training, "train", train)
    return actions


def test_tab_is_listed(tab):
    harness, module = tab
    assert ("Mix-of-Show training", "mos_train") in [(t, e) for _, t, e in harness.ui_tabs]
    assert module.default_tokens("Anna B") == "<AnnaB1>+<AnnaB2>"
    assert module.parse_tokens(" <a> + <b>") == ("<a>", "<b>")
    for bad in ("", "a+b", "<a b>"):
        with pytest.raises(ValueError, match="tokens"):
            module.parse_tokens(bad)
    for bad in ("", "../x", "a/b", ".hidden", "c:x"):
        with pytest.raises(ValueError, match="without folders"):
            module.concept_path(bad)
    assert module.concept_path("disc.safetensors").name == "disc.safetensors"


def test_training_saves_a_concept_every_list_finds_and_leaves_the_model_identical(tab, images, at_step):
    """Progress and live previews through the host's API; a generation bypassing the queue is
    refused mid-run; the file is read back with its tokens and listed by the Lora extension, the
    concept library and the regional script's LoRA route; the model is bit-identical."""
    import networks

    from modules import progress, shared

    harness, module = tab
    before = model_hash(harness.model)
    refused: list[str] = []

    def generate() -> None:
        try:
            harness.txt2img("a photo of <disc1> <disc2>", steps=1)
        except RuntimeError as e:
            refused.append(str(e))

    seen = []
    at_step[2] = generate
    # previews are drawn after step 3's progress report, so step 4's report shows one
    at_step[4] = lambda: seen.append(progress.progressapi(progress.ProgressRequest(id_task="task(train)")))
    gallery, status = run_job(module, *job_args(images, sample_every=3, sample_prompt="a photo of <TOK>\n<TOK> on grass"))
    assert "Saved" in status and "Time taken" in status, status
    assert refused and "Mix-of-Show training is running (step 2 of 6)" in refused[0]
    answer = seen[0]
    assert answer.active and "step 4/6" in answer.textinfo and 0 < answer.progress <= 1
    assert answer.live_preview and answer.live_preview.startswith("data:image/png;base64,")
    assert gallery["visible"] is True  # shown now that there are samples
    assert len(gallery["value"]) == 4 and gallery["value"][0][1] == "step 3: a photo of <TOK>"  # steps 3 and 6
    assert model_hash(harness.model) == before
    assert not hasattr(harness.model, "mos_training") and module.RUNNING is None

    out = Path(shared.cmd_opts.lora_dir) / "disc.safetensors"
    assert lora_files() == ["disc.safetensors"]
    concept = read_concept(out)
    assert concept.tokens == ("<disc1>", "<disc2>") and concept.embeddings.shape[:2] == (2, 16)
    assert "disc" in networks.available_networks  # <lora:disc> works at once
    from lib_mos.files import import_sibling

    binding = import_sibling(str(ROOT / "scripts" / "mos_generation.py"), "mos_host_binding")
    assert [e.tokens for e in binding.LIBRARY.scan(shared.cmd_opts.lora_dir).entries] == [("<disc1>", "<disc2>")]
    generation = importlib.util.spec_from_file_location("mos_generation_under_test", ROOT / "scripts" / "mos_generation.py")
    mos_generation = importlib.util.module_from_spec(generation)
    generation.loader.exec_module(mos_generation)
    assert mos_generation.lora_list()["loras"] == [{"name": "disc", "path": "disc.safetensors",
                                                     "tokens": ["<disc1>", "<disc2>"]}]
    images_out = harness.txt2img("a photo of <disc1> <disc2>", steps=2)
    assert images_out.images  # generation works again, with the new concept


def test_unet_lora_learns_through_ldm_checkpointed_blocks(tab, images):
    """Hosts before v1.10.0 built SD1 with `use_checkpoint: True` (v1-inference.yaml); ldm's own
    CheckpointFunction returns no gradient for a hooked LoRA's parameters. The trainer switches
    those flags off while it trains, so the UNet LoRA moves from its initial zero `up`, and
    puts them back."""
    harness, module = tab
    unet = harness.model.model.diffusion_model
    flagged = [(m, a) for m in unet.modules() for a in ("checkpoint", "use_checkpoint") if hasattr(m, a)
               and isinstance(getattr(m, a), bool)]
    assert flagged and not any(getattr(m, a) for m, a in flagged)  # v1.10.1 builds without (repair_config)
    for m, a in flagged:
        setattr(m, a, True)
    try:
        before = model_hash(harness.model)
        _, status = run_job(module, *job_args(images, steps=3, lr_text=0.0))
        assert "Saved" in status, status
        assert all(getattr(m, a) for m, a in flagged)
        assert model_hash(harness.model) == before
    finally:
        for m, a in flagged:
            setattr(m, a, False)
    from modules import shared

    concept = read_concept(Path(shared.cmd_opts.lora_dir) / "disc.safetensors")
    ups = [f.up for f in concept.unet_lora.values()]
    assert len(ups) == 128 and all(bool(u.abs().sum() > 0) for u in ups)


def test_interrupt_without_checkpoint_writes_nothing(tab, images, at_step):
    from modules import shared

    harness, module = tab
    before = model_hash(harness.model)
    at_step[3] = shared.state.interrupt
    gallery, status = run_job(module, *job_args(images))
    assert "Interrupted at step 3 of 6" in status and "no checkpoint was written" in status, status
    assert fields(gallery) == {"value": None, "visible": False} and lora_files() == []
    assert model_hash(harness.model) == before
    assert not shared.state.interrupted  # the host resets the flag after the job


def test_interrupt_keeps_the_checkpoint_and_resume_finishes(tab, images, at_step):
    from lib_mos.training.trainer import state_path
    from modules import shared

    harness, module = tab
    before = model_hash(harness.model)
    at_step[3] = shared.state.interrupt
    _, status = run_job(module, *job_args(images, save_every=2))
    out = Path(shared.cmd_opts.lora_dir) / "disc.safetensors"
    assert "Interrupted at step 3 of 6" in status and str(out) in status, status
    assert out.is_file() and state_path(out).is_file()
    assert model_hash(harness.model) == before
    at_step.clear()
    _, status = run_job(module, *job_args(images, save_every=2, resume=True))
    assert "Saved" in status, status
    assert lora_files() == ["disc.safetensors"]  # the resume state is gone
    assert model_hash(harness.model) == before


def test_errors_are_one_message_and_write_nothing(tab, images, tmp_path):
    from modules import shared

    harness, module = tab
    before = model_hash(harness.model)
    missing = tmp_path / "no-such-folder"
    _, status = run_job(module, *job_args(missing))
    assert "error" in status and str(missing) in status and "Traceback" not in status, status
    _, status = run_job(module, *job_args(images, name="../escape"))
    assert "error" in status and "without folders" in status
    _, status = run_job(module, *job_args(images, tokens="disc"))
    assert "error" in status and "&lt;a&gt;+&lt;b&gt;" in status
    harness.model.is_sd2 = True
    try:
        _, status = run_job(module, *job_args(images))
        assert "error" in status and "SD2" in status and "SD1.x and SDXL" in status
    finally:
        del harness.model.is_sd2
    harness.model.lowvram = True
    try:
        _, status = run_job(module, *job_args(images))
        assert "error" in status and "--lowvram" in status
    finally:
        del harness.model.lowvram
    assert lora_files() == [] and model_hash(harness.model) == before
    assert not hasattr(harness.model, "mos_training") and not shared.state.interrupted


def test_generation_guard_refuses_while_training(tab):
    """The always-on script refuses in its first hook (the host only reports it), and the tab's
    guard on the UNet wrapper makes the generation itself fail with the same message."""
    from modules import processing, scripts

    harness, module = tab
    concepts = next(s for s in scripts.scripts_txt2img.alwayson_scripts if s.title() == "Mix-of-Show concepts")
    status = module.TrainingStatus(4, 10)
    with module.generation_refused(harness.model, status):
        with pytest.raises(RuntimeError, match=r"training is running \(step 4 of 10\).*interrupt it"):
            concepts.before_process(processing.StableDiffusionProcessingTxt2Img())
        with pytest.raises(RuntimeError, match=r"step 4 of 10"):
            harness.txt2img("a cat", steps=1)
        assert any("before_process" in e and "step 4 of 10" in e for e in scripts.reported_errors)
        status.step = 5
        with pytest.raises(RuntimeError, match=r"step 5 of 10"):
            harness.txt2img("a cat", steps=1)
    concepts.before_process(processing.StableDiffusionProcessingTxt2Img())
    assert harness.txt2img("a cat", steps=1).images


def test_a_merged_lora_is_taken_out_before_training(tab, images, at_step):
    """A Lora the last generation applied stays merged in the host's weights; training sees the
    checkpoint's own weights, and the next generation with that Lora is as before."""
    from test_cli_trigger_words import write_kohya_lora

    from modules import shared

    harness, module = tab
    write_kohya_lora(Path(shared.cmd_opts.lora_dir) / "hero.safetensors", activation_text="ohwx man")
    base = model_hash(harness.model)
    first = harness.txt2img("a man <lora:hero:1>", steps=2).images[0]
    assert model_hash(harness.model) != base  # merged by the forward passes
    during = []
    at_step[1] = lambda: during.append(model_hash(harness.model))
    _, status = run_job(module, *job_args(images, steps=2))
    assert "Saved" in status and "Lora networks (hero) were taken out" in status, status
    assert during == [base] and model_hash(harness.model) == base
    again = harness.txt2img("a man <lora:hero:1>", steps=2).images[0]
    assert torch.equal(torch.tensor(list(first.getdata())), torch.tensor(list(again.getdata())))


def test_vae_moves_off_the_gpu_when_the_setting_asks(tab, images, at_step, monkeypatch):
    """The host's "Move VAE and CLIP to RAM when training": the VAE goes to the CPU after the
    images are encoded, comes back for each preview, and is on the GPU again at the end."""
    from modules import devices, shared

    harness, module = tab
    shared.opts.unload_models_when_training = True
    vae = harness.model.first_stage_model
    moves: list[str] = []
    real_to = vae.to

    def to(*args, **kwargs):
        moves.append(str(args[0]))
        return real_to(*args, **kwargs)

    monkeypatch.setattr(vae, "to", to)
    at_step[1] = lambda: moves.append(f"step 1, parallel {shared.parallel_processing_allowed}")
    _, status = run_job(module, *job_args(images, steps=2, sample_every=2))
    assert "Saved" in status, status
    device = str(devices.device)
    assert moves == ["cpu", "step 1, parallel False", device, "cpu", device]
    assert shared.parallel_processing_allowed


# ------------------------------------------------------------------------------ what the page shows


def test_the_page_opens_on_the_device_proposal_and_shows_only_what_the_kind_uses(tab):
    """Before Train: the fields of the initial Kind only, the class word with its templates, the
    authors' regulariser, steps/batch/resolution proposed for the host's device (the double's is a
    CPU) with their estimated time, no gallery and a disabled Interrupt."""
    from lib_mos.training import plan

    harness, module = tab
    get = page_components(harness)
    assert get("mos_train_kind").value == "ED-LoRA (concept tokens)"
    assert get("mos_train_tokens").visible is True and get("mos_train_trigger").visible is False
    assert get("mos_train_attn_reg").visible is True and get("mos_train_attn_reg").value == 0.01
    assert get("mos_train_lr_embedding").visible is True
    lora = module.kind_fields("LoRA (trigger words)")  # tokens, trigger words, regulariser, embedding rate
    assert [u["visible"] for u in lora] == [False, True, False, False]
    assert [u["visible"] for u in module.kind_fields("ED-LoRA (concept tokens)")] == [True, False, True, True]
    assert "0.01" in get("mos_train_attn_reg").info and "without a mask is fine" in get("mos_train_attn_reg").info
    assert get("mos_train_class_word").value == "person" and get("mos_train_templates").value == "human"
    assert get("mos_train_gallery").visible is False
    assert get("mos_train_interrupt").interactive is False and get("mos_train_run").interactive is not False
    kind, ram, threads = module.host_device()
    assert (kind, threads) == ("cpu", torch.get_num_threads()) and ram > 2**30
    proposed = plan.propose("cpu", ram, "sd1", threads=threads)
    shown = (get("mos_train_steps").value, get("mos_train_batch_size").value, get("mos_train_resolution").value)
    assert shown == (proposed.steps, proposed.batch_size, proposed.resolution)
    assert shown != (1000, 4, 512)  # not the authors' recipe on a CPU
    estimate = get("mos_train_estimate").value
    assert f"Estimated time: <b>{plan.format_duration(proposed.seconds)}</b>" in estimate, estimate
    assert f"this CPU ({threads} thread{'' if threads == 1 else 's'}, {ram / 2**30:.0f} GiB RAM)" in estimate
    assert "from a measurement on a CPU" in estimate
    assert "The authors' recipe (1000 steps, batch 4, 512 px) would take about" in estimate


def test_the_kind_shows_its_own_fields_and_the_run_ignores_the_others(tab, images):
    harness, module = tab
    get = page_components(harness)
    kind = get("mos_train_kind")
    (dependency, fn), = handlers(harness.blocks, kind)
    ids = {name: get(f"mos_train_{name}")._id for name in ("tokens", "trigger", "attn_reg", "lr_embedding")}
    for label, shown in (("LoRA (trigger words)", {"trigger"}),
                         ("ED-LoRA (concept tokens)", {"tokens", "attn_reg", "lr_embedding"})):
        updates = outputs_by_id(harness.blocks, dependency, fn(label))
        assert set(updates) == set(ids.values())
        assert {name for name, i in ids.items() if updates[i]["visible"]} == shown, label
    # a LoRA run with the (hidden) regulariser field at its default trains: the weight is for ED-LoRA only
    _, status = run_job(module, *job_args(images, kind_label="LoRA (trigger words)", tokens="", trigger="rdball",
                                          attn_reg_weight=0.01, steps=2))
    assert "Saved" in status and "trigger words rdball" in status, status


def test_the_authors_regulariser_trains_a_folder_without_masks(tab, images):
    _harness, module = tab
    assert not list(images.glob("*mask*"))
    _, status = run_job(module, *job_args(images, attn_reg_weight=0.01, steps=2))
    assert "Saved" in status, status


def test_the_caption_templates_follow_the_class_word(tab):
    harness, _module = tab
    get = page_components(harness)
    (dependency, fn), = handlers(harness.blocks, get("mos_train_class_word"))
    template = get("mos_train_templates")
    for word, expected in (("dog", "object"), ("woman", "human"), ("painting", "style"), ("", "object")):
        update, = outputs_by_id(harness.blocks, dependency, [fn(word)]).items()
        assert update[0] == template._id and fields(update[1]) == {"value": expected}
        assert expected in template.choices or (expected, expected) in template.choices


def test_the_estimate_follows_steps_batch_and_resolution(tab):
    from lib_mos.training import plan

    harness, module = tab
    get = page_components(harness)
    estimate = get("mos_train_estimate")
    fields = [get(f"mos_train_{name}") for name in ("steps", "batch_size", "resolution")]
    threads = module.host_device()[2]
    for field in fields:
        (dependency, fn), = handlers(harness.blocks, field)
        assert dependency["inputs"] == [f._id for f in fields] and dependency["outputs"] == [estimate._id]
        for values in ((100, 1, 128), (400, 2, 256)):
            text = fn(*values)
            want = plan.format_duration(plan.estimate_seconds(*values, "cpu", threads=threads))
            assert f"<b>{want}</b> for {values[0]} steps of batch {values[1]} at {values[2]} px" in text, text
    assert "would take" not in fn(1000, 4, 512)  # that is the authors' recipe itself
    assert "set the steps" in fn(None, 1, 64) and "set the steps" in fn(-5, 1, 64)


def test_the_proposal_reads_the_cuda_device_and_its_memory(tab, monkeypatch):
    from types import SimpleNamespace

    from lib_mos.training import plan
    from modules import devices

    _harness, module = tab
    monkeypatch.setattr(devices, "device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def properties(device):
        asked.append(device)
        return SimpleNamespace(total_memory=12 * 2**30)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert module.proposal() == plan.propose("cuda", 12 * 2**30) and module.proposal().batch_size == 2
    assert asked[0] == torch.device("cuda", 0)
    text = module.estimate_html(1000, 2, 512)
    assert "this GPU, 12 GiB" in text and "assumed from published timings" in text and "would take" in text

    def broken(device):
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    assert module.proposal() == plan.propose("cuda", None)


def test_interrupt_is_enabled_only_while_the_run_goes(tab):
    """Train: Interrupt on (at once, outside the queue), then the job with the page's task id,
    then Interrupt off whether the job succeeded or not."""
    harness, _module = tab
    get = page_components(harness)
    stop, gallery, status = get("mos_train_interrupt"), get("mos_train_gallery"), get("mos_train_status")
    blocks = harness.blocks
    run = get("mos_train_run")
    chain = [(i, d, blocks.fns[i].fn) for i, d in enumerate(blocks.dependencies) if run._id in d["targets"]]
    assert [d["trigger"] for _, d, _ in chain] == ["click", "then", "then"]
    (first, on, on_fn), (second, job, _), (_, off, off_fn) = chain
    assert on["outputs"] == [stop._id] and fields(on_fn()) == {"interactive": True}
    assert on["queue"] is False
    assert job["trigger_after"] == first and job["js"] == "mosTrainSubmit"
    assert job["outputs"] == [gallery._id, status._id]
    assert off["trigger_after"] == second and off["trigger_only_on_success"] is False
    assert off["outputs"] == [stop._id] and fields(off_fn()) == {"interactive": False}


def test_stale_ui_config_defaults_do_not_override_the_proposal(tmp_path, tiny_checkpoint):
    """The host writes every default into ui-config.json on first start; those of the old tab
    (1000 steps, batch 4, 512 px, regulariser 0, no class word, a saved Kind) must not come back."""
    import json

    from host_harness import HostHarness

    from lib_mos.training import plan

    config = tmp_path / "ui-config.json"
    config.write_text(json.dumps({
        "mos_train/Steps/value": 1000, "mos_train/Batch size/value": 4, "mos_train/Resolution/value": 512,
        "mos_train/Kind/value": "LoRA (trigger words)", "mos_train/Attention regulariser weight (0: off)/value": 0.0,
        "mos_train/Class word (e.g. man, dog; initialises the last token)/value": "",
        "mos_train/Caption templates/value": "none"}))
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ROOT)], ui_config_file=config)
    try:
        get = page_components(harness)
        proposed = plan.propose("cpu", ram_bytes(), "sd1", threads=torch.get_num_threads())
        assert (get("mos_train_steps").value, get("mos_train_batch_size").value,
                get("mos_train_resolution").value) == (proposed.steps, proposed.batch_size, proposed.resolution)
        assert get("mos_train_kind").value == "ED-LoRA (concept tokens)" and get("mos_train_tokens").visible
        assert get("mos_train_attn_reg").value == 0.01
        assert get("mos_train_class_word").value == "person" and get("mos_train_templates").value == "human"
    finally:
        harness.close()
    saved = json.loads(config.read_text())
    assert "mos_train/Class word (person, man, dog, ...)/value" in saved  # others are kept
    fresh = tmp_path / "fresh.json"
    harness = HostHarness(tmp_path / "data2", tiny_checkpoint, extensions=[str(ROOT)], ui_config_file=fresh)
    harness.close()
    keys = json.loads(fresh.read_text())
    assert not [k for k in keys if k.startswith(("mos_train/Steps/", "mos_train/Batch size/", "mos_train/Resolution/",
                                                 "mos_train/Kind/"))]


def test_training_tab_in_a_browser(tmp_path, tiny_checkpoint, images, at_step, browser_page):
    """Chromium on the double's page: only the Kind's fields show, the templates follow the class
    word, the estimate follows the steps; no gallery and a disabled Interrupt while idle; during a
    run Interrupt is enabled and the live preview shows in the gallery; Interrupt stops it, the
    samples stay and Interrupt is disabled again."""
    import threading

    from host_harness import HostHarness

    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ROOT)])
    gate, reached = threading.Event(), threading.Event()

    def hold() -> None:
        reached.set()
        gate.wait(60)

    at_step[2] = hold
    try:
        page = browser_page.page
        page.set_default_timeout(30_000)
        page.goto(harness.serve())
        page.click("#tabs > .tab-nav > button:has-text('Mix-of-Show training')")
        page.wait_for_selector("#mos_train_tokens", state="visible")
        assert page.is_hidden("#mos_train_trigger")
        assert page.locator("#mos_train_gallery").count() == 1 and page.is_hidden("#mos_train_gallery")
        assert page.is_disabled("#mos_train_interrupt") and page.is_enabled("#mos_train_run")
        assert "Estimated time" in page.inner_text("#mos_train_estimate")

        page.click("#mos_train_kind label:has-text('LoRA (trigger words)')")
        page.wait_for_selector("#mos_train_trigger", state="visible")
        page.wait_for_selector("#mos_train_tokens", state="hidden")
        page.click("#mos_train_kind label:has-text('ED-LoRA (concept tokens)')")
        page.wait_for_selector("#mos_train_tokens", state="visible")
        page.wait_for_selector("#mos_train_trigger", state="hidden")

        page.fill("#mos_train_class_word textarea", "ball")
        page.press("#mos_train_class_word textarea", "Tab")
        page.wait_for_function("gradioApp().querySelector('#mos_train_templates input').value === 'object'")
        for elem, value in (("steps", "3"), ("batch_size", "1"), ("resolution", "64")):
            page.fill(f"#mos_train_{elem} input[type=number]", value)
            page.press(f"#mos_train_{elem} input[type=number]", "Tab")  # gradio reads the number on blur
        page.wait_for_function("/for 3 steps of batch 1 at 64 px/.test("
                               "gradioApp().querySelector('#mos_train_estimate').textContent)")
        page.fill("#mos_train_folder textarea", str(images))
        page.click("#mos_train_advanced .label-wrap")
        page.fill("#mos_train_sample_every input[type=number]", "1")
        page.press("#mos_train_sample_every input[type=number]", "Tab")
        page.click("#mos_train_run")

        assert reached.wait(120), "the run never reached step 2"
        page.wait_for_function("!gradioApp().querySelector('#mos_train_interrupt').disabled")
        page.wait_for_selector("#mos_train_gallery .livePreview img", state="visible")  # step 1's sample
        page.click("#mos_train_interrupt")
        gate.set()
        page.wait_for_function("/Interrupted at step 2 of 3/.test("
                               "gradioApp().querySelector('#mos_train_status').textContent)", timeout=120_000)
        page.wait_for_function("gradioApp().querySelector('#mos_train_interrupt').disabled")
        page.wait_for_selector("#mos_train_gallery .livePreview", state="detached")  # the host's progress ended
        assert page.is_visible("#mos_train_gallery")  # now by gradio: the samples of steps 1 and 2
        assert page.locator("#mos_train_gallery img").count() >= 2
        harness.wait_idle()
        assert not browser_page.errors, browser_page.errors
    finally:
        gate.set()
        harness.close()


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fields(update: dict) -> dict:
    """A gradio update without its type tag."""
    return {k: v for k, v in update.items() if k != "__type__"}


def page_components(harness):
    """`get(elem_id)`: the page's one component with that elem_id."""
    from test_host_ui import component

    return lambda elem_id: component(harness.blocks, elem_id)


@pytest.fixture
def tab_xl(tmp_path, tiny_sdxl_checkpoint):
    yield from _tab_on(tmp_path, tiny_sdxl_checkpoint)


def test_the_trainers_view_of_a_live_sdxl_model_encodes_as_the_host(tab_xl):
    """bigG is a transformers model over the host's OpenCLIP weights: a prompt encodes to the host's
    own context and vector (at the host's size), and every one of its parameters is a view of a host
    tensor (no copy: full size would be 1.4 GB in fp16, 2.8 GB in fp32)."""
    from lib_mos.concepts import binding
    from modules import prompt_parser, shared

    _, module = tab_xl
    model = module.live_model(shared.sd_model)
    assert model.family.name == "sdxl"
    assert model.text_root[0] is shared.sd_model.conditioner.embedders[0].wrapped.transformer
    prompt = "a photo of a red ball"
    host = shared.sd_model.get_learned_conditioning(prompt_parser.SdConditioning([prompt], width=64, height=48))
    ours = model.encode_ids(binding.tokenize(model, [prompt]), width=64, height=48)
    torch.testing.assert_close(ours["crossattn"], host["crossattn"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["vector"], host["vector"], rtol=1e-4, atol=1e-5)
    host_te2 = {p.untyped_storage().data_ptr() for p in shared.sd_model.conditioner.embedders[1].parameters()}
    assert all(p.untyped_storage().data_ptr() in host_te2 for p in model.text_root[1].parameters())
    assert not any(b.device.type == "meta" for b in model.text_root[1].buffers())


def test_the_tab_trains_an_sdxl_concept_that_binds(tab_xl, images):
    """On an SDXL checkpoint the tab trains 70 rows per token over both encoders, writes a file that
    says so, leaves the model bit-identical, and the concept's tokens generate at once."""
    from lib_mos.models.family import SDXL
    from modules import shared

    harness, module = tab_xl
    before = model_hash(harness.model)
    gallery, status = run_job(module, *job_args(images, sample_every=6))
    assert "Saved" in status, status
    concept = read_concept(Path(shared.cmd_opts.lora_dir) / "disc.safetensors", family=SDXL)
    assert concept.embeddings.shape == (2, 70, 80) and {n[:2] for n in concept.text_lora} == {"0.", "1."}
    assert len(gallery["value"]) == 1  # a preview at step 6
    assert model_hash(harness.model) == before
    res = harness.txt2img("a photo of <disc1> <disc2>", steps=2, width=64, height=64)
    assert "<disc1> <disc2> from disc.safetensors" in res.infotexts[0]
