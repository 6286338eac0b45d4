"""sgm/models/diffusion.py: DiffusionEngine, as far as the host touches it: `model` (the UNet in an
OpenAIWrapper), `conditioner`, `first_stage_model`, `scale_factor`, `denoiser.scaling`;
`decode_first_stage(z)` divides by the scale factor and decodes, `encode_first_stage(x)` encodes
and multiplies (sgm's autoencoder samples its posterior inside `encode`). The host replaces
`get_learned_conditioning`, `apply_model` and `get_first_stage_encoding` on the class
(modules/sd_models_xl.py)."""

from __future__ import annotations

import torch
from torch import nn

from sgm.modules.diffusionmodules.denoiser_scaling import EpsScaling
from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper


class _Denoiser(nn.Module):
    def __init__(self, scaling):
        super().__init__()
        self.scaling = scaling


class DiffusionEngine(nn.Module):
    def __init__(self, network: nn.Module, conditioner: nn.Module, first_stage_model: nn.Module,
                 scale_factor: float = 1.0, scaling=None):
        super().__init__()
        self.model = OpenAIWrapper(network)
        self.denoiser = _Denoiser(scaling if scaling is not None else EpsScaling())
        self.conditioner = conditioner
        self.first_stage_model = first_stage_model
        self.scale_factor = scale_factor
        self.disable_first_stage_autocast = False
        self.input_key = "jpg"

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x)  # the wrapper's encode samples
