"""The A1111 host double turned into the Forge double for whole generations (`HostHarness(forge=True)`).

Forge keeps A1111's `modules` (processing, scripts, prompt parsing, infotext), so the double keeps
the A1111 double's and changes what Forge changes, as read in Forge's source at dfdcbab:
- the model is reached as an engine: `forge_objects.unet.model.diffusion_model`, prompts encoded
  by its `text_processing_engine` (textual inversion per engine, the TI infotext collected from
  the engine by the conditioning step), no `cond_stage_model_empty_prompt`;
- `setup_conds` encodes no negatives at CFG scale 1 (modules/processing.py);
- the CFG denoiser is Forge's (modules/sd_samplers_cfg_denoiser.py + backend/sampling): chunks,
  uncond first, `transformer_options["cond_or_uncond"]` on every UNet call.

Lenient where the host double's own machinery needs it: the model object still has A1111's
attributes (`model`, `cond_stage_model`) because the double's processing and VAE use them; the
extension's Forge row never reads them (a test checks that what it reads exists on the engine
double too, `tests/test_host_forge_row.py`). Stricter: no hires pass, SD1 only.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from backend.diffusion_engine import IntegratedCLIP
from backend.sampling import sampling_function as forge_sampling
from backend.text_processing import classic_engine
from backend.text_processing.classic_engine import ClassicTextProcessingEngine


def forge_shaped(model) -> None:
    """Give the loaded A1111-double model Forge's engine surface (see the module docstring)."""
    wrapped = model.cond_stage_model.wrapped
    embeddings = wrapped.transformer.text_model.embeddings
    if hasattr(embeddings.token_embedding, "wrapped"):  # Forge has no A1111 hijack: its engine wraps the bare one
        embeddings.token_embedding = embeddings.token_embedding.wrapped
    clip_l = IntegratedCLIP(wrapped.transformer)
    model.forge_objects = SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=model.model.diffusion_model)),
        clip=SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=clip_l), tokenizer=wrapped.tokenizer))
    model.text_processing_engine = engine = ClassicTextProcessingEngine(clip_l, wrapped.tokenizer, "clip_l")

    @torch.inference_mode()
    def get_learned_conditioning(prompt):
        return engine(list(prompt))

    model.get_learned_conditioning = get_learned_conditioning
    del model.cond_stage_model_empty_prompt


def _setup_conds(original):
    def setup_conds(p) -> None:
        if p.is_hr_pass or getattr(p, "enable_hr", False):
            raise NotImplementedError("the Forge double has no hires pass")
        original(p)
        if p.cfg_scale == 1:
            p.uc = None  # Forge: "Skipping unconditional conditioning when CFG = 1"
        p.extra_generation_params.update(classic_engine.last_extra_generation_params)
        classic_engine.last_extra_generation_params.clear()
    return setup_conds


def _forward(denoiser, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
    from modules import prompt_parser, sd_samplers_common, shared
    from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
    from modules.shared import opts, state

    if state.interrupted or state.skipped:
        raise sd_samplers_common.InterruptedException
    composition, cond = prompt_parser.reconstruct_multicond_batch(cond, denoiser.step)
    uncond = prompt_parser.reconstruct_cond_batch(uncond, denoiser.step) if uncond is not None else None
    params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, denoiser)
    cfg_denoiser_callback(params)
    if opts.skip_early_cond > 0 and denoiser.step / denoiser.total_steps <= opts.skip_early_cond:
        cond_scale = 1.0
        denoiser.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
    elif (denoiser.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
        cond_scale = 1.0
        denoiser.p.extra_generation_params["NGMS"] = s_min_uncond
    unet = shared.sd_model.forge_objects.unet.model.diffusion_model
    wrap = denoiser.inner_model

    def apply_model(x_in, sigma_in, context, options):  # Forge's KModel: eps prediction to denoised
        s = sigma_in[:, None, None, None]
        eps = unet(x_in / (s ** 2 + 1) ** 0.5, wrap.sigma_to_t(sigma_in), context=context,
                   transformer_options=options)
        return x_in - eps * s

    denoised, _, _ = forge_sampling.sampling_function(apply_model, params.x, params.sigma, params.text_cond,
                                                      params.text_uncond, composition, cond_scale)
    denoiser.sampler.last_latent = denoised
    denoiser.step += 1
    return denoised


class ForgeMode:
    """Installed on a harness after its model loads; `remove` puts the A1111 double back."""

    def __init__(self, model) -> None:
        from modules import processing, sd_samplers_cfg_denoiser

        forge_shaped(model)
        self._saved = [(processing.StableDiffusionProcessing, "setup_conds",
                        processing.StableDiffusionProcessing.setup_conds),
                       (sd_samplers_cfg_denoiser.CFGDenoiser, "forward", sd_samplers_cfg_denoiser.CFGDenoiser.forward)]
        processing.StableDiffusionProcessing.setup_conds = _setup_conds(processing.StableDiffusionProcessing.setup_conds)
        sd_samplers_cfg_denoiser.CFGDenoiser.forward = _forward
        classic_engine.last_extra_generation_params.clear()

    def remove(self) -> None:
        for owner, name, value in self._saved:
            setattr(owner, name, value)
        self._saved = []
