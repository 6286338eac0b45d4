"""Host glue: the "Mix-of-Show" txt2img script (Script dropdown).

A global prompt everywhere (the main prompt and negative) and, inside each region, that region's
prompt and negative, in every cross-attention layer; concept tokens are bound layer-wise in the
main prompt and in region prompts. The host calls a dropdown script's `run` only, before it
activates extra networks and encodes prompts, so everything that needs the live text encoder
happens lazily at each step's `on_cfg_denoiser` (cached per generation); the attn2 processors are
installed for exactly this generation and removed in `finally`.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re

import gradio as gr
import torch

from lib_mos.attention import SteppedRegionalContext, attn2_processor
from lib_mos.binding import PromptBinder
from lib_mos.concept_files import METADATA_KEY, find_concept_files, read_concept
from lib_mos.concepts import Concept, ConceptError
from lib_mos.fusion import read_fused_concepts
from lib_mos.regions import RegionSpec, attention_sizes, layer_masks
from modules import paths, processing, script_callbacks, scripts, shared


def _sibling(name: str):
    """Import another file of scripts/ by path: the host imports each as a top-level module, so
    there is no package to import it from, and sys.path is left alone."""
    spec = importlib.util.spec_from_file_location(f"mos_{name}_for_regional", os.path.join(os.path.dirname(
        os.path.abspath(__file__)), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mos_host_binding = _sibling("mos_host_binding")
TITLE = "Mix-of-Show"
INFOTEXT_KEY = "Mix-of-Show regions"
_TOKEN = re.compile(r"<[^<>:\s,]+>")
_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")


def concept_tokens_mentioned(texts: list[str]) -> set[str]:
    """`<name>` tokens in the texts, extra-network tags like `<lora:x:1>` excluded."""
    return {t for text in texts for t in _TOKEN.findall(_EXTRA_NETWORK.sub(" ", text))}


def available_concepts(wanted: set[str]) -> list[Concept]:
    """Concepts fused into the loaded checkpoint, then concept files in models/Lora (our format,
    recognised by metadata) that define a wanted token. An unknown token is an error."""
    import json

    from safetensors import safe_open

    found: list[Concept] = []
    have: set[str] = set()
    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    if info is not None and str(info.filename).endswith(".safetensors"):
        for c in read_fused_concepts(info.filename):
            found.append(c)
            have.update(c.tokens)
    folder = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    for path in find_concept_files(folder):
        if not (wanted - have) or path.suffix.lower() != ".safetensors":
            continue
        with safe_open(str(path), "pt") as f:
            tokens = set(json.loads((f.metadata() or {})[METADATA_KEY]).get("tokens", []))
        if tokens & (wanted - have):
            c = read_concept(path)
            found.append(c)
            have.update(c.tokens)
    unknown = wanted - have
    if unknown:
        raise ConceptError(f"unknown concept token(s) {', '.join(sorted(unknown))}: not in the loaded checkpoint "
                           f"and no concept file in {folder} defines them (known: {', '.join(sorted(have)) or 'none'})")
    return [c for c in found if set(c.tokens) & wanted]


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad [..., T, D] to `length` tokens with the host's empty-prompt chunks (as pad_cond_uncond)."""
    if t.shape[-2] == length:
        return t
    empty = shared.sd_model.cond_stage_model_empty_prompt.to(t.device, t.dtype)[0]  # [77, D]
    chunks = (length - t.shape[-2]) // empty.shape[0]
    pad = empty.repeat(chunks, 1).expand(*t.shape[:-2], -1, -1)
    return torch.cat([t, pad], dim=-2)


class RegionalJob:
    """One generation's state: spec, concepts, encodings (cached), the processor."""

    def __init__(self, p, spec: RegionSpec) -> None:
        self.p = p
        self.spec = spec
        def as_list(v) -> list:
            return list(v) if isinstance(v, list) else [v or ""]

        texts = as_list(p.prompt) + as_list(p.negative_prompt)
        texts += [r.prompt for r in spec.regions] + [r.negative for r in spec.regions]
        if getattr(p, "enable_hr", False) and p.hr_prompt:
            texts.append(p.hr_prompt)
        concepts = available_concepts(concept_tokens_mentioned([str(t) for t in texts]))
        self.binder = PromptBinder(None, concepts)  # used for its token rows; encoding is the host's
        self.processor = SteppedRegionalContext()
        self.cache: dict[str, torch.Tensor] = {}
        self.masks: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.plans: dict[tuple, tuple] = {}  # per row layout, size and prompts: built once, reused each step

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[n, L, T, D] through the host's encoder (binding concept tokens), cached."""
        from modules.sd_hijack import model_hijack

        return mos_host_binding.encode_bound(shared.sd_model, model_hijack.embedding_db, self.binder, prompts,
                                             self.cache)

    def on_step(self, params) -> None:
        try:
            self._plan(params)
        except BaseException as e:  # the host only logs callback errors: fail the next UNet call
            self.processor.error = e

    def _plan(self, params) -> None:
        p = self.p
        n_cond, n_uncond = params.text_cond.shape[0], params.text_uncond.shape[0]
        height, width = params.x.shape[-2] * 8, params.x.shape[-1] * 8
        prompts = p.hr_prompts if getattr(p, "is_hr_pass", False) else p.prompts
        key = (n_cond, n_uncond, width, height, tuple(prompts))
        if key not in self.plans:
            self.plans = {key: self._build_plan(params, n_cond, n_uncond, width, height, prompts)}
        region, weights, cond = self.plans[key]
        context = None
        if cond is not None:  # the uncond may change between steps (prompt editing): joined every step
            uncond = params.text_uncond.unsqueeze(1).expand(-1, self.binder.layers, -1, -1)
            t = max(cond.shape[-2], uncond.shape[-2])
            context = torch.cat([_pad_tokens(cond.to(uncond.dtype), t), _pad_tokens(uncond, t)]).to(region.device)
        self.processor.set_step(region, weights, context)

    def _build_plan(self, params, n_cond: int, n_uncond: int, width: int, height: int, prompts) -> tuple:
        p = self.p
        if (width, height) not in self.masks:
            self.masks[(width, height)] = (
                layer_masks(self.spec, width, height, base_size=(p.width, p.height)) if self.spec.regions
                else [torch.zeros(1, h * w) for h, w in attention_sizes(width, height)])
        masks = self.masks[(width, height)]
        k = len(self.spec.regions)
        rows = n_cond + n_uncond
        device = params.x.device
        if k:
            pos = self.encode([r.prompt for r in self.spec.regions])
            neg = self.encode([r.negative for r in self.spec.regions])
            t = max(pos.shape[-2], neg.shape[-2])
            pos, neg = _pad_tokens(pos, t), _pad_tokens(neg, t)
            region = torch.cat([pos.transpose(0, 1).unsqueeze(0).expand(n_cond, -1, -1, -1, -1),
                                neg.transpose(0, 1).unsqueeze(0).expand(n_uncond, -1, -1, -1, -1)])
        else:  # binding only: no region, all-zero weights make every layer plain attention
            region = params.text_uncond.new_zeros(rows, 1, 1, params.text_uncond.shape[-1])
        weights = [m.to(device) for m in masks]
        cond = None
        if self.binder.rows and any(self.binder.concept_tokens_in(q) for q in prompts):
            if n_cond != len(prompts):
                raise ConceptError("concept tokens cannot be combined with AND in the prompt")
            cond = self.encode(list(prompts)).to(device)  # [B, L, T, D]
        return region.to(device), weights, cond


_active: list[RegionalJob] = []


def _on_cfg_denoiser(params) -> None:
    """Registered once at import; acts only while a Mix-of-Show generation runs."""
    if _active and params.denoiser is not None and params.denoiser.p is _active[-1].p:
        _active[-1].on_step(params)


script_callbacks.on_cfg_denoiser(_on_cfg_denoiser, name="mix_of_show_regions")


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
        """The region canvas (javascript/mix_of_show.js) above the JSON it reads and writes; the
        JSON textbox is the one input, so infotext, the API and "Send to txt2img" need no canvas."""
        regions_id = self.elem_id("regions")
        gr.HTML(canvas_html(regions_id, "img2img" if is_img2img else "txt2img"), elem_id=self.elem_id("canvas"))
        regions = gr.Textbox(label="Regions (JSON)", lines=2, max_lines=6, elem_id=regions_id,
                             placeholder='{"regions": [{"prompt": "a photo of <cat1> <cat2>", "box": [0, 0, 1, 0.5], '
                                         '"units": "fraction"}]}')
        self.infotext_fields = [(regions, INFOTEXT_KEY)]
        self.paste_field_names = [INFOTEXT_KEY]
        return [regions]

    def run(self, p, regions_json: str = ""):
        spec = RegionSpec.from_json(regions_json) if (regions_json or "").strip() else RegionSpec(())
        job = RegionalJob(p, spec)
        p.extra_generation_params["Script"] = TITLE
        if spec.regions:
            p.extra_generation_params[INFOTEXT_KEY] = spec.to_json()
        unet = shared.sd_model.model.diffusion_model
        _active.append(job)
        try:
            with attn2_processor(unet, job.processor):
                return processing.process_images(p)
        finally:
            _active.remove(job)
            job.processor.clear()
