"""modules/sd_models_xl.py: what the host adds to sgm's classes to run SDXL like SD1.

- `DiffusionEngine.get_learned_conditioning(batch)`: every embedder's `ucg_rate` set to 0; the
  conditioner gets {"txt": batch, "original_size_as_tuple": [height, width], "crop_coords_top_left":
  [opts.sdxl_crop_top, opts.sdxl_crop_left], "target_size_as_tuple": [height, width],
  "aesthetic_score"} repeated per prompt, width/height from the batch's attributes (1024 when
  absent or falsy); a negative batch whose prompts are all "" asks for zero "txt" embeddings
  (`force_zero_embeddings=['txt']`: both text encoders' outputs, pooled included, become zeros).
  Returns {"crossattn": [B, 77k, D], "vector": [B, V]}.
- `DiffusionEngine.apply_model(x, t, cond)`: `self.model(x, t, cond)` (OpenAIWrapper).
- `get_first_stage_encoding(x)`: x (encode_first_stage already scaled).
- GeneralConditioner gains `encode_embedding_init_text` (the embedders' results concatenated on
  dim 1), `tokenize`, `process_texts`, `get_target_prompt_token_count` (the first embedder that has
  the method answers).
- `extend_sdxl(model)`: `diffusion_model.dtype`, `model.conditioning_key = 'crossattn'`,
  `cond_stage_key = 'txt'`, `parameterization` from the denoiser's scaling, `alphas_cumprod` from
  the legacy DDPM discretization (float32), and `conditioner.wrapped` an empty Module.
"""

from __future__ import annotations

import sgm.models.diffusion
import sgm.modules
import sgm.modules.diffusionmodules.denoiser_scaling
import sgm.modules.diffusionmodules.discretizer
import torch

from modules import devices, shared


def get_learned_conditioning(self, batch):
    for embedder in self.conditioner.embedders:
        embedder.ucg_rate = 0.0
    width = getattr(batch, "width", 1024) or 1024
    height = getattr(batch, "height", 1024) or 1024
    is_negative_prompt = getattr(batch, "is_negative_prompt", False)
    opts = shared.opts
    aesthetic_score = (opts.sdxl_refiner_low_aesthetic_score if is_negative_prompt
                       else opts.sdxl_refiner_high_aesthetic_score)
    args = dict(device=devices.device, dtype=devices.dtype)
    n = len(batch)
    sdxl_conds = {
        "txt": batch,
        "original_size_as_tuple": torch.tensor([height, width], **args).repeat(n, 1),
        "crop_coords_top_left": torch.tensor([opts.sdxl_crop_top, opts.sdxl_crop_left], **args).repeat(n, 1),
        "target_size_as_tuple": torch.tensor([height, width], **args).repeat(n, 1),
        "aesthetic_score": torch.tensor([aesthetic_score], **args).repeat(n, 1),
    }
    force_zero = is_negative_prompt and all(x == "" for x in batch)
    return self.conditioner(sdxl_conds, force_zero_embeddings=["txt"] if force_zero else [])


def apply_model(self, x, t, cond):
    if self.is_sdxl_inpaint:
        x = torch.cat([x] + cond["c_concat"], dim=1)
    return self.model(x, t, cond)


def get_first_stage_encoding(self, x):
    return x


sgm.models.diffusion.DiffusionEngine.get_learned_conditioning = get_learned_conditioning
sgm.models.diffusion.DiffusionEngine.apply_model = apply_model
sgm.models.diffusion.DiffusionEngine.get_first_stage_encoding = get_first_stage_encoding


def encode_embedding_init_text(self, init_text, nvpt):
    res = [e.encode_embedding_init_text(init_text, nvpt) for e in self.embedders
           if hasattr(e, "encode_embedding_init_text")]
    return torch.cat(res, dim=1)


def tokenize(self, texts):
    for embedder in self.embedders:
        if hasattr(embedder, "tokenize"):
            return embedder.tokenize(texts)
    raise AssertionError("no tokenizer available")


def process_texts(self, texts):
    for embedder in self.embedders:
        if hasattr(embedder, "process_texts"):
            return embedder.process_texts(texts)
    return None


def get_target_prompt_token_count(self, token_count):
    for embedder in self.embedders:
        if hasattr(embedder, "get_target_prompt_token_count"):
            return embedder.get_target_prompt_token_count(token_count)
    return None


sgm.modules.GeneralConditioner.encode_embedding_init_text = encode_embedding_init_text
sgm.modules.GeneralConditioner.tokenize = tokenize
sgm.modules.GeneralConditioner.process_texts = process_texts
sgm.modules.GeneralConditioner.get_target_prompt_token_count = get_target_prompt_token_count


def extend_sdxl(model) -> None:
    unet = model.model.diffusion_model
    unet.dtype = next(unet.parameters()).dtype
    model.model.conditioning_key = "crossattn"
    model.cond_stage_key = "txt"
    model.parameterization = ("v" if isinstance(model.denoiser.scaling, sgm.modules.diffusionmodules.denoiser_scaling.VScaling)
                              else "eps")
    discretization = sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization()
    model.alphas_cumprod = torch.asarray(discretization.alphas_cumprod, device=devices.device, dtype=torch.float32)
    model.conditioner.wrapped = torch.nn.Module()
