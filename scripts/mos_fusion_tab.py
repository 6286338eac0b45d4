"""Host glue: the "Mix-of-Show fusion" tab, which behaves like the host's Checkpoint Merger.

It reads the UI and runs `python -m lib_mos fuse` in a child process (`lib_mos.fusion.process`)
under the host's queue, with a task id so the host's progress bar shows (javascript/
mix_of_show_fusion.js), and an Interrupt button. The child reads the base from its file and
writes atomically into the checkpoint folder; when it exits its memory goes back to the system,
and its crash is one message here, not the WebUI's end. The checkpoint lists (the tab's and the
top one) show the new file at once. The live model is never touched."""

from __future__ import annotations

import contextlib
import html
import math
import os
import threading
from pathlib import Path

import gradio as gr

from lib_mos.concepts.files import family_of_file, read_concept, sidecar_path
from lib_mos.files import import_sibling
from lib_mos.fusion.process import FusionProcessInterrupted, run_fusion_process
from lib_mos.fusion.report import PICTURE, concept_summary
from modules import call_queue, devices, script_callbacks, sd_models, shared

mos_host = import_sibling(__file__, "mos_host")
mos_host_binding = import_sibling(__file__, "mos_host_binding")
concept_folder = mos_host_binding.concept_folder

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `python -m lib_mos` runs here
TAB_TITLE = "Mix-of-Show fusion"
STAGE_LABELS = {"text encoder": "te", "cross-attention k/v": "kv", "spatial layers": "spatial"}
TABLE_HEADERS = ["concept file", "tokens (rename as <a>+<b>)", "trigger words (LoRAs without tokens)",
                 "UNet weight", "text weight"]
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth")  # what the host's Lora lists, and the authors' .pth
NO_TRIGGER_WORDS = "(no tokens, and no trigger words found: type them in the trigger words column)"


def concept_choices() -> list[str]:
    """Every LoRA file in the Lora folder and its subfolders, as the host's Lora lists them (any
    kind: our concept files, kohya and LyCORIS LoRAs, which fuse by their trigger words), and the
    authors' .pth files; not the files the concept library found unreadable (`folder_problems`)."""
    folder = Path(concept_folder())
    if not folder.is_dir():
        return []
    broken = {path for path, _ in mos_host_binding.LIBRARY.scan(folder).problems}
    return [os.path.relpath(p, folder) for p in sorted(folder.rglob("*"))
            if p.suffix.lower() in LORA_SUFFIXES and p not in broken and p.is_file()]


def folder_problems() -> str:
    """HTML naming the files of the Lora folder that could not be read, or ''."""
    text = mos_host_binding.LIBRARY.scan(concept_folder()).problem_text()
    return f"<p>Unreadable files in the Lora folder: {html.escape(text)}</p>" if text else ""


def _cell(value) -> str:
    """A text cell as the page sends it back: an emptied cell may come as None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def concept_row(rel: str) -> list:
    """[file, tokens, trigger words, UNet weight, text weight] of one file. A concept with tokens
    has no trigger words; a LoRA without tokens shows the words it would use (its sidecar json's
    activation text, else its most frequent training tag) and where they came from, or, when it
    has none, asks for them: the user types them in the trigger words column."""
    path = os.path.join(concept_folder(), rel)
    try:
        family = family_of_file(path)  # SD1 or SDXL, as the file says; the fusion checks it against the base
        concept = read_concept(path, family=family)
    except Exception as e:  # shown in the table; fusing it will report the full error
        try:  # a LoRA that is readable but has no trigger words anywhere (or a broken sidecar json)
            read_concept(path, trigger="-", family=family_of_file(path))
        except Exception:
            return [rel, f"(unreadable: {e})", "", 1.0, 1.0]
        side, why = str(sidecar_path(path)), str(e)
        if side in why:  # its json is broken: say so
            return [rel, f"{NO_TRIGGER_WORDS[:-1]}; {why.replace(side, os.path.basename(side))})", "", 1.0, 1.0]
        return [rel, NO_TRIGGER_WORDS, "", 1.0, 1.0]
    if concept.tokens:
        return [rel, "+".join(concept.tokens), "", 1.0, 1.0]
    source = concept.trigger_source or "the file"
    return [rel, f"(no tokens: trigger words from {source})", concept.prompt_words, 1.0, 1.0]


def _file_rows(table) -> list[list]:
    """The rows of a table (the page's DataFrame, or a list) that name a file: a row left empty, as
    the table's "New row" adds one, is no concept."""
    rows = table.values.tolist() if hasattr(table, "values") else (table or [])
    return [list(r) for r in rows if len(r) and _cell(r[0])]


def concept_table(selected: list[str], current=None) -> list[list]:
    """One row per selected file; rows the user already edited keep their values."""
    kept = {r[0]: r for r in _file_rows(current) if len(r) == len(TABLE_HEADERS)}
    return [list(kept[rel]) if rel in kept else concept_row(rel) for rel in selected or []]


_NEWEST_TABLE: dict[str, int] = {}  # page id -> the newest table request's count (mosFusionTableStamp)
_NEWEST_LOCK = threading.Lock()


def table_for_selection(selected: list[str], current=None, stamp: str = ""):
    """`concept_table_value` for the page's newest selection. The table is asked for on every change
    and again when the list closes (the page sends no new change while one is pending: in the real
    WebUI, two SDXL files picked quickly showed one row until the list closed), and the host runs
    the requests concurrently, so an earlier selection's table may finish last; `stamp` is
    "<page id>:<count>" from the page, and a request a newer one from the same page has overtaken
    changes nothing."""
    page, _, count = (stamp or "").rpartition(":")
    number = int(count) if count.isdigit() else None
    if number is not None:
        with _NEWEST_LOCK:
            _NEWEST_TABLE[page] = max(_NEWEST_TABLE.get(page, 0), number)
    value = concept_table_value(selected, current)
    if number is not None and _NEWEST_TABLE[page] > number:
        return gr.update()
    return value


def with_headers(headers: list[str], rows: list[list]) -> dict:
    """A table's value with its headers. Gradio 3.41's page takes a table's headers from its value,
    and a value that is a list with no rows carries none (`Dataframe.postprocess([])` sends headers
    [], and the page numbers a fixed table's columns "0".."4"); a dict is sent as it is."""
    return {"headers": list(headers), "data": rows}


def concept_table_value(selected: list[str], current=None) -> dict:
    """The concept table for the page (`concept_table`), its headers kept when nothing is selected."""
    return with_headers(TABLE_HEADERS, concept_table(selected, current))


def _concept_args(table) -> list[str]:
    """`--concept` arguments, one per table row: `FILE[:<a>+<b>][#trigger words]@UNET,TEXT`
    (`fused_checkpoint.parse_concept_spec`; the listed files all end in a suffix, so '#' starts
    the words). The trigger words are passed as the table shows them, edited or not; on a row
    of a concept with tokens the child refuses them, naming the file."""
    args = []
    for rel, tokens, trigger, unet_weight, text_weight in (r[:5] for r in _file_rows(table)):
        path = os.path.join(concept_folder(), rel)
        renamed = f":{_cell(tokens)}" if _cell(tokens).startswith("<") else ""
        words = f"#{_cell(trigger)}" if _cell(trigger) else ""
        args += ["--concept", f"{path}{renamed}{words}@{float(unet_weight):g},{float(text_weight):g}"]
    return args


def output_path(name: str) -> Path:
    name = (name or "").strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(f"output name {name!r}: give a file name, without folders")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return Path(shared.cmd_opts.ckpt_dir or sd_models.model_path) / name


def loaded_checkpoint() -> str:
    """The title of the checkpoint the top dropdown shows, which the next generation runs on.
    Asked at every page load and run, not once: the host loads it while the UI is being built.
    The setting, not `shared.sd_model`: after a generation with a checkpoint override the host
    restores the setting but keeps the override's weights loaded until the next generation. Only
    a setting naming no file falls back to the weights loaded now."""
    setting = shared.opts.sd_model_checkpoint
    info = sd_models.get_closet_checkpoint_match(setting) if setting else None  # ("" would match any)
    if info is None:
        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    return info.title if info is not None else ""


def settings_note(steps: float, size: float, seeds: float = 4, base_title: str | None = None) -> str:
    """A warning under the spatial sliders, before the user fuses, when these settings cannot
    determine the widest layers of the base's family (`fusion.spatial_shortfall`; SD1.5's when the
    base is not known)."""
    from lib_mos.fusion import pipeline as fusion
    from lib_mos.models import sd1, sdxl
    from lib_mos.models.checkpoints import family_of_checkpoint
    from lib_mos.models.family import SDXL

    config = sd1.SD15
    info = sd_models.get_closet_checkpoint_match(base_title) if base_title else None
    if info is not None:
        with contextlib.suppress(ValueError, OSError):  # not readable here: the fusion itself will say so
            config = sdxl.SDXL_BASE if family_of_checkpoint(info.filename) is SDXL else sd1.SD15
    settings = fusion.FusionSettings(spatial_steps=int(steps), spatial_size=int(size), spatial_seeds=int(seeds))
    shortfall = fusion.spatial_shortfall(config, settings)
    return f"<p class='mos-warning'>&#9888; {html.escape(shortfall)}</p>" if shortfall else ""


CHECK_STEPS = 8  # the picture check behind the report's verdict (`lib_mos.fusion.check`)
MEMORY_GB = 8.0  # the fusion process's budget on the CPU (the CLI's default), less when less is free
MEMORY_SHARE = 0.85  # of the memory the system has available beside the WebUI


def memory_budget_gb() -> float:
    """What the fusion child may hold on the CPU: the CLI's 8 GB, or 85 % of what the system has
    available now when that is less (Linux's MemAvailable), so a fusion beside a WebUI holding its
    own model does not push either out of memory; the child refuses a budget too small for the
    model part and one layer before any work, naming the figure."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
    except (OSError, StopIteration, ValueError):
        return MEMORY_GB
    return round(min(MEMORY_GB, MEMORY_SHARE * available), 1)

REPORT_HEADERS = ["concept", "stage", "layers", "fused error", "averaged error", "held-out error",
                  "held-out averaged", "distance (x own change)", "rows / width", "flags"]


def _report_rows(report: list[dict]) -> list[list]:
    def num(value):
        return round(value, 4) if isinstance(value, (int, float)) else None

    return [[r["concept"], r["stage"], r["layers"], num(r["fused"]), num(r["average"]), num(r.get("held_out")),
             num(r.get("held_out_average")), num(r.get("distance")),
             f"{r['rows']} / {r['width']}" if r.get("width") else "", ", ".join(r.get("flags") or [])] for r in report]


def run_fusion(id_task, base_title, table, stages, solver, spatial_steps, spatial_size, spatial_seeds, seed, dtype,
               name, overwrite, files=None):
    """The tab's job, under the host's queue lock (`wrap_gradio_gpu_call`, `id_task` from the page).
    With `files` (the selection) the table is reconciled with it first: the host runs events
    concurrently, so a table update for an earlier selection may have arrived last."""
    if files is not None:
        table = concept_table(files, table)
    for row in _file_rows(table):
        if _cell(row[1]).startswith(NO_TRIGGER_WORDS[:-1]) and not _cell(row[2]):
            raise ValueError(f"{row[0]}: a LoRA without tokens and without trigger words: type its trigger words in "
                             "the table")
    base_title = base_title or loaded_checkpoint()
    info = sd_models.get_closet_checkpoint_match(base_title)
    if info is None:
        raise ValueError(f"base checkpoint {base_title!r} not found; press refresh")
    out = output_path(name)
    args = ["--base", info.filename, "--solver", solver, "--spatial-steps", str(int(spatial_steps)),
            "--spatial-size", str(int(spatial_size)), "--spatial-seeds", str(int(spatial_seeds)),
            "--seed", str(int(seed)), "--dtype", dtype, "--check-steps", str(CHECK_STEPS),
            "--device", str(devices.device), "--memory-gb", str(budget_gb := memory_budget_gb()), *_concept_args(table)]
    for stage in sorted(set(STAGE_LABELS.values()) - {STAGE_LABELS[s] for s in stages or []}):
        args += ["--skip-stage", stage]
    if overwrite:
        args.append("--overwrite")
    shared.state.job = TAB_TITLE
    shared.state.job_count = 1

    def progress(what: str, done: int, total: int) -> None:
        shared.state.textinfo = f"{TAB_TITLE}: {what}"
        shared.state.sampling_step, shared.state.sampling_steps = done, total

    try:
        result = run_fusion_process(args, out, progress=progress, cwd=EXTENSION_ROOT,
                                    should_stop=lambda: shared.state.interrupted or shared.state.skipped)
    except FusionProcessInterrupted as e:
        return None, gr.update(), f"<p>Interrupted: {html.escape(str(e).removeprefix('interrupted: '))}.</p>"
    sd_models.list_models()
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    peak = max((v for v in (result.get("peak_rss_mb") or {}).values() if v), default=None)
    if peak is not None:  # Linux: what the budget bounds, so a user sees it held
        seconds += f"; memory {peak / 1024:.1f} GiB at most" + (
            f" (budget {budget_gb:g} GiB)" if devices.device.type == "cpu" else "")
    warnings = "".join(f"<p class='mos-warning'>&#9888; {html.escape(w)}</p>" for w in result["warnings"])
    notes = "".join(f"<p>{html.escape(_short_note(n))}</p>" for n in result.get("notes", ()))
    verdicts = "".join(f"<p>{html.escape(line)}</p>" for line in concept_summary(result["report"])
                       if any(r["stage"] == PICTURE for r in result["report"]))
    return (with_headers(REPORT_HEADERS, _report_rows(result["report"])), gr.update(choices=sd_models.checkpoint_tiles(), value=base_title),
            f"{warnings}{notes}{verdicts}<p>Saved <code>{html.escape(str(result['path']))}</code> ({seconds}). It is in the checkpoint "
            "list now.</p>")


def _short_note(note: str) -> str:
    """The child's line on a LoRA's trigger words, with the file relative to the Lora folder and
    without the command-line hint (here the words are edited in the table)."""
    folder = os.path.join(concept_folder(), "")
    note = note.removeprefix(folder)
    return note.rpartition("; ")[0] if note.endswith("to choose others") else note


def interrupt() -> None:
    """The host's Interrupt: the running fusion's child is stopped at once and writes nothing."""
    shared.state.interrupt()


def on_ui_tabs():
    if mos_host.FUSION_MESSAGE:
        return mos_host.message_tab(TAB_TITLE, "mos_fusion", mos_host.FUSION_MESSAGE)
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("Merge several Mix-of-Show concepts into one checkpoint (gradient fusion). Each layer is "
                    "solved exactly for the weight that reproduces every concept's own outputs.")
        with gr.Row():
            # a function: gradio calls it at every page load; and the host must not remember a value
            # in ui-config.json, which would outlive the checkpoint it named
            base = gr.Dropdown(label="Base checkpoint (default: the one loaded now)", choices=sd_models.checkpoint_tiles(),
                               value=loaded_checkpoint, elem_id="mos_fusion_base")
            base.do_not_save_to_config = True
            files = gr.Dropdown(label="Concept files (models/Lora)", choices=concept_choices(), multiselect=True,
                                elem_id="mos_fusion_files")
            refresh = gr.Button("Refresh", elem_id="mos_fusion_refresh")
        # the value names the headers: with no rows a list value would lose them (`with_headers`)
        table = gr.Dataframe(value=with_headers(TABLE_HEADERS, []), headers=TABLE_HEADERS,
                             datatype=["str", "str", "str", "number", "number"],
                             row_count=(mos_host.table_rows_at_least(), "dynamic"),
                             col_count=(len(TABLE_HEADERS), "fixed"), interactive=True,
                             elem_id="mos_fusion_table")
        with gr.Row():
            stages = gr.CheckboxGroup(label="Stages", choices=list(STAGE_LABELS), value=list(STAGE_LABELS))
            solver = gr.Radio(label="Solver", choices=["exact", "lbfgs"], value="exact")
            dtype = gr.Radio(label="Saved weights", choices=["fp16", "fp32"], value="fp16")
        with gr.Row():
            steps = gr.Slider(label="Spatial sampling steps", minimum=1, maximum=50, step=1, value=20,
                              elem_id="mos_fusion_spatial_steps")
            size = gr.Slider(label="Spatial sampling size", minimum=256, maximum=1024, step=64, value=512,
                             elem_id="mos_fusion_spatial_size")
            # more seeds: more independent rows for the widest layers in the same batch (cheap on a GPU)
            seeds = gr.Slider(label="Spatial noise seeds per concept", minimum=1, maximum=8, step=1, value=4,
                              elem_id="mos_fusion_spatial_seeds")
            seed = gr.Number(label="Seed", value=0, precision=0)
        note = gr.HTML(settings_note(20, 512, 4), elem_id="mos_fusion_settings_note")
        with gr.Row():
            name = gr.Textbox(label="Output name", value="mix-of-show-fused.safetensors", elem_id="mos_fusion_name")
            overwrite = gr.Checkbox(label="Overwrite", value=False)
            run = gr.Button("Fuse", variant="primary", elem_id="mos_fusion_run")
            stop = gr.Button("Interrupt", interactive=False, elem_id="mos_fusion_interrupt")  # live only while fusing
        # the page puts the task id here (mosFusionSubmit); a textbox, as Forge's own: gradio 4 cannot
        # take a string into a Label
        task_id = gr.Textbox(visible=False)
        task_id.do_not_save_to_config = True  # a per-request value, never a default
        with gr.Group(elem_id="mos_fusion_results_panel"):
            report = gr.Dataframe(headers=REPORT_HEADERS, interactive=False, elem_id="mos_fusion_report")
            status = gr.HTML(folder_problems(), elem_id="mos_fusion_status")

        for control in (steps, size, seeds, base):
            control.change(fn=settings_note, inputs=[steps, size, seeds, base], outputs=[note])
        # again when the list closes; an earlier selection's table never overwrites a newer one's
        table_stamp = gr.Textbox(visible=False)
        for event in (files.change, files.blur):
            event(fn=table_for_selection, _js="mosFusionTableStamp", inputs=[files, table, table_stamp], outputs=[table])
        refresh.click(fn=lambda: (gr.update(choices=sd_models.checkpoint_tiles()), gr.update(choices=concept_choices()),
                                  folder_problems()),
                      inputs=[], outputs=[base, files, status])
        # Interrupt on, the job (the page's task id first: mosFusionSubmit), Interrupt off whatever the outcome:
        # while idle the host's interrupt would stop another tab's job, or nothing
        job = run.click(fn=lambda: gr.update(interactive=True), inputs=[], outputs=[stop], queue=False,
                        show_progress="hidden")
        job = job.then(fn=call_queue.wrap_gradio_gpu_call(run_fusion, extra_outputs=[None, gr.update()]),
                       _js="mosFusionSubmit", inputs=[task_id, base, table, stages, solver, steps, size, seeds, seed,
                                                      dtype, name, overwrite, files],
                       outputs=[report, base, status])
        job.then(fn=lambda: gr.update(interactive=False), inputs=[], outputs=[stop], queue=False, show_progress="hidden")
        stop.click(fn=interrupt, inputs=[], outputs=[])
    return [(tab, TAB_TITLE, "mos_fusion")]


script_callbacks.on_ui_tabs(on_ui_tabs)
