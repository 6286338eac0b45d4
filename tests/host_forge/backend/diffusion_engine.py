"""An SD1 model as Forge holds it (Forge: backend/diffusion_engine/sd15.py): an engine with
`forge_objects` (UNet patcher, CLIP) and one text-processing engine, no `model` attribute and no
`cond_stage_model_empty_prompt`; conditioning is computed under inference mode."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from backend.text_processing.classic_engine import ClassicTextProcessingEngine


class IntegratedCLIP(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


class StableDiffusion:
    is_sd1 = True

    def __init__(self, model) -> None:
        """`model`: lib_mos's `SD1Model` (its UNet and transformers CLIP text model)."""
        clip_l = IntegratedCLIP(model.text_encoder)
        self.forge_objects = SimpleNamespace(
            unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=model.unet)),
            clip=SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=clip_l), tokenizer=model.tokenizer))
        self.text_processing_engine = ClassicTextProcessingEngine(clip_l, model.tokenizer, embedding_key="clip_l")
        self.sd_checkpoint_info = None

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        return self.text_processing_engine(prompt)
