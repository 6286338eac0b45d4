"""Host glue: the two scripts that run inside a generation.

- "Mix-of-Show" (txt2img Script dropdown): a global prompt everywhere and, inside each region
  drawn on the canvas, that region's prompt and negative, in every cross-attention layer.
- "Mix-of-Show concepts" (always on, txt2img and img2img, no UI): concept tokens in the prompt
  and negative bind layer-wise in every generation, as textual-inversion embeddings do, with or
  without the dropdown script; it does nothing when no prompt mentions a `<token>`.

The per-step work is `mos_job.GenerationJob`'s; the callback below is registered once at import
and acts only on a generation that has a job.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from lib_mos.concepts.library import lora_files
from lib_mos.files import import_sibling
from lib_mos.models.family import family_of_unet
from lib_mos.regional.regions import RegionSpec
from modules import processing, script_callbacks, scripts, shared

mos_host = import_sibling(__file__, "mos_host")
mos_job = import_sibling(__file__, "mos_job")
mos_host_binding = import_sibling(__file__, "mos_host_binding")

TITLE = "Mix-of-Show"
CONCEPTS_TITLE = "Mix-of-Show concepts"
INFOTEXT_KEY = mos_job.REGIONS_KEY

LORAS_ROUTE = "/mix-of-show/loras"


def lora_list() -> dict:
    """The LoRA files a region may use with the loaded model, for the canvas' picker: name (as
    `<lora:name>` says it), path in the Lora folder, and concept tokens of our concept files. Only
    files for the loaded model's family are listed (an SD1 LoRA cannot go into an SDXL region)."""
    folder = Path(mos_host_binding.concept_folder())
    library = mos_host_binding.LIBRARY
    tokens = {entry.path: entry.tokens for entry in library.scan(folder).entries}
    model = shared.sd_model
    try:
        family = family_of_unet(mos_host.unet_of(model)) if model is not None else None
    except ValueError:
        return {"loras": [], "family": None}
    return {"family": family.name if family else None,
            "loras": [{"name": name, "path": path.relative_to(folder).as_posix(), "tokens": list(tokens.get(path, ()))}
                      for name, path in lora_files(folder).items() if family is None or library.family(path) is family]}


def _add_routes(demo, app) -> None:
    app.add_api_route(LORAS_ROUTE, lora_list, methods=["GET"])


mos_host.announce()
if mos_host.SUPPORTED:  # elsewhere nothing is hooked: the host's own generation runs untouched
    mos_host.register(script_callbacks.on_cfg_denoiser, mos_job.on_cfg_denoiser, "mix_of_show")
    mos_host.register(script_callbacks.on_app_started, _add_routes, "mix_of_show_loras")


def canvas_html(regions_id: str, tab: str) -> str:
    """Where the canvas mounts: it finds the JSON textbox and the tab's size sliders by id."""
    return (f'<div class="mos-canvas" data-regions="{html.escape(regions_id)}" data-tab="{html.escape(tab)}">'
            "<p>The region canvas needs the extension's javascript; the JSON below works without it.</p></div>")


class MixOfShowScript(scripts.Script):
    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool):
        return not is_img2img

    def ui(self, is_img2img: bool):
        """The region canvas (javascript/) above the JSON it reads and writes; the JSON textbox is
        the one input, so infotext, the API and "Send to txt2img" need no canvas."""
        regions_id = self.elem_id("regions")
        if not mos_host.SUPPORTED:  # the same one input, so the API's script_args keep their layout
            gr.Markdown(mos_host.MESSAGE, elem_id=self.elem_id("unsupported"))
            return [gr.Textbox(label="Regions (JSON)", visible=False, elem_id=regions_id)]
        gr.HTML(canvas_html(regions_id, "img2img" if is_img2img else "txt2img"), elem_id=self.elem_id("canvas"))
        gr.Markdown("The main prompt and negative apply everywhere outside the regions. Inside a region its own "
                    "prompt, negative and LoRAs apply; the main prompt is kept there only at the *global prompt* "
                    "weight (0 by default: the region's prompt replaces it, as Mix-of-Show's authors do; set it "
                    "for the whole spec beside Feather, or per region).", elem_classes=["mos-hint"])
        regions = gr.Textbox(label="Regions (JSON)", lines=2, max_lines=6, elem_id=regions_id,
                             placeholder='{"regions": [{"prompt": "a photo of <cat1> <cat2>", "box": [0, 0, 1, 0.5], '
                                         '"units": "fraction"}]}')
        self.infotext_fields = [(regions, INFOTEXT_KEY)]
        self.paste_field_names = [INFOTEXT_KEY]
        return [regions]

    def run(self, p, regions_json: str = ""):
        mos_host.require_supported()
        spec = RegionSpec.from_json(regions_json) if (regions_json or "").strip() else RegionSpec(())
        job = mos_job.GenerationJob(p, spec, strict=True)
        p.extra_generation_params["Script"] = TITLE
        job.record_infotext()
        with job.installed():
            return processing.process_images(p)


class MixOfShowConcepts(scripts.Script):
    """Concept tokens bind in every generation; a no-op for prompts without `<token>`s."""

    def title(self) -> str:
        return CONCEPTS_TITLE

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        return []

    def before_process(self, p, *args) -> None:
        """Refuse while the Mix-of-Show training tab trains this model (its status is on the model;
        the tab holds the queue, so only a path that bypasses it gets here). The host only reports
        what this hook raises; the tab's own guard on the UNet wrapper fails the generation."""
        if not mos_host.SUPPORTED:
            return
        training = getattr(shared.sd_model, "mos_training", None)
        if training is not None:
            raise RuntimeError(str(training))

    def process(self, p, *args) -> None:
        # nothing in an unsupported host; with the dropdown script, its job does the work
        if not mos_host.SUPPORTED or mos_job.job_of(p) is not None:
            return
        job = mos_job.GenerationJob(p, None, strict=False)
        if job.needed:
            job.record_infotext()
            job.attach()

    def postprocess(self, p, processed, *args) -> None:
        job = mos_job.job_of(p)
        if job is not None:
            job.uninstall()  # a no-op for the dropdown's job, which removes its own hooks
