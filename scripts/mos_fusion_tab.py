"""Host glue: the "Mix-of-Show fusion" tab. Reads the UI, calls `lib_mos.fusion.fuse_checkpoint`
under the host's queue with progress and interrupt, saves into the checkpoint folder and refreshes
the checkpoint list. The live model is never touched: the base is read from its file."""

from __future__ import annotations

import html
import os
from pathlib import Path

import gradio as gr
import torch

from lib_mos import fusion
from lib_mos.concept_files import read_concept
from lib_mos.files import import_sibling
from modules import call_queue, devices, script_callbacks, sd_models, shared

mos_host_binding = import_sibling(__file__, "mos_host_binding")
concept_folder = mos_host_binding.concept_folder

TAB_TITLE = "Mix-of-Show fusion"
STAGE_LABELS = {"text encoder": "te", "cross-attention k/v": "kv", "spatial layers": "spatial"}
TABLE_HEADERS = ["concept file", "tokens (rename as <a>+<b>)", "UNet weight", "text weight"]


def concept_choices() -> list[str]:
    """Concept files in the Lora folder (ordinary LoRAs are not listed)."""
    scan = mos_host_binding.LIBRARY.scan(concept_folder())
    return [os.path.relpath(e.path, scan.folder) for e in scan.entries]


def folder_problems() -> str:
    """HTML naming the files of the Lora folder that could not be read, or ''."""
    text = mos_host_binding.LIBRARY.scan(concept_folder()).problem_text()
    return f"<p>Unreadable files in the Lora folder: {html.escape(text)}</p>" if text else ""


def concept_table(selected: list[str], current=None) -> list[list]:
    """One row per selected file; rows the user already edited keep their values."""
    kept = {}
    if current is not None:
        rows = current.values.tolist() if hasattr(current, "values") else current
        kept = {r[0]: r for r in rows if r and r[0]}
    rows = []
    for rel in selected or []:
        if rel in kept:
            rows.append(list(kept[rel]))
            continue
        try:
            tokens = "+".join(read_concept(os.path.join(concept_folder(), rel)).tokens)
        except Exception as e:  # shown in the table; fusing it will report the full error
            tokens = f"(unreadable: {e})"
        rows.append([rel, tokens, 1.0, 1.0])
    return rows


def _specs(table) -> list[fusion.ConceptSpec]:
    rows = table.values.tolist() if hasattr(table, "values") else (table or [])
    specs = []
    for rel, tokens, unet_weight, text_weight in (r[:4] for r in rows if r and r[0]):
        path = os.path.join(concept_folder(), rel)
        spec = fusion.parse_concept_spec(f"{path}:{tokens}" if str(tokens).startswith("<") else path,
                                         float(unet_weight), float(text_weight))
        specs.append(spec)
    return specs


def output_path(name: str) -> Path:
    name = (name or "").strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ValueError(f"output name {name!r}: give a file name, without folders")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return Path(shared.cmd_opts.ckpt_dir or sd_models.model_path) / name


def loaded_checkpoint() -> str:
    """The title of the checkpoint loaded now (the host loads it while the UI is being built, so
    ask at page load and at run time, not once)."""
    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    return info.title if info is not None else (shared.opts.sd_model_checkpoint or "")


def run_fusion(base_title, table, stages, solver, spatial_steps, spatial_size, seed, dtype, name, overwrite):
    """The tab's job (runs under the host's queue lock through `wrap_gradio_gpu_call`)."""
    base_title = base_title or loaded_checkpoint()
    info = sd_models.get_closet_checkpoint_match(base_title)
    if info is None:
        raise ValueError(f"base checkpoint {base_title!r} not found; press refresh")
    specs = _specs(table)
    out = output_path(name)
    settings = fusion.FusionSettings(solver=solver, spatial_steps=int(spatial_steps), spatial_size=int(spatial_size),
                                     seed=int(seed), skip=frozenset(set(STAGE_LABELS.values()) -
                                                                    {STAGE_LABELS[s] for s in stages or []}))
    shared.state.job = TAB_TITLE
    shared.state.job_count = 1

    def progress(what: str, done: int, total: int) -> None:
        shared.state.textinfo = f"{TAB_TITLE}: {what}"
        shared.state.sampling_step, shared.state.sampling_steps = done, total

    path, result = fusion.fuse_checkpoint(info.filename, specs, out, settings,
                                          dtype=torch.float16 if dtype == "fp16" else torch.float32,
                                          overwrite=bool(overwrite), device=str(devices.device), progress=progress,
                                          should_stop=lambda: shared.state.interrupted or shared.state.skipped)
    sd_models.list_models()
    rows = [[r["concept"], r["stage"], r["layers"], round(r["fused"], 4), round(r["average"], 4)] for r in result.report]
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    return (rows, gr.update(choices=sd_models.checkpoint_tiles(), value=base_title),
            f"<p>Saved <code>{html.escape(str(path))}</code> ({seconds}). It is in the checkpoint list now.</p>")


def on_ui_tabs():
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
        table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "str", "number", "number"], row_count=(0, "dynamic"),
                             col_count=(4, "fixed"), interactive=True, elem_id="mos_fusion_table")
        with gr.Row():
            stages = gr.CheckboxGroup(label="Stages", choices=list(STAGE_LABELS), value=list(STAGE_LABELS))
            solver = gr.Radio(label="Solver", choices=["exact", "lbfgs"], value="exact")
            dtype = gr.Radio(label="Saved weights", choices=["fp16", "fp32"], value="fp16")
        with gr.Row():
            steps = gr.Slider(label="Spatial sampling steps", minimum=1, maximum=50, step=1, value=20,
                              elem_id="mos_fusion_spatial_steps")
            size = gr.Slider(label="Spatial sampling size", minimum=256, maximum=1024, step=64, value=512,
                             elem_id="mos_fusion_spatial_size")
            seed = gr.Number(label="Seed", value=0, precision=0)
        with gr.Row():
            name = gr.Textbox(label="Output name", value="mix-of-show-fused.safetensors", elem_id="mos_fusion_name")
            overwrite = gr.Checkbox(label="Overwrite", value=False)
            run = gr.Button("Fuse", variant="primary", elem_id="mos_fusion_run")
        report = gr.Dataframe(headers=["concept", "stage", "layers", "fused error", "averaged error"],
                              interactive=False, elem_id="mos_fusion_report")
        status = gr.HTML(folder_problems(), elem_id="mos_fusion_status")

        files.change(fn=concept_table, inputs=[files, table], outputs=[table])
        refresh.click(fn=lambda: (gr.update(choices=sd_models.checkpoint_tiles()), gr.update(choices=concept_choices()),
                                  folder_problems()),
                      inputs=[], outputs=[base, files, status])
        run.click(fn=call_queue.wrap_gradio_gpu_call(run_fusion, extra_outputs=[None, gr.update()]),
                  inputs=[base, table, stages, solver, steps, size, seed, dtype, name, overwrite],
                  outputs=[report, base, status])
    return [(tab, TAB_TITLE, "mos_fusion")]


script_callbacks.on_ui_tabs(on_ui_tabs)
