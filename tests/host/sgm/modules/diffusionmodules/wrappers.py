"""sgm/modules/diffusionmodules/wrappers.py: OpenAIWrapper calls the UNet with the conditioning
dict's "concat" (concatenated to x along channels; empty when absent), "crossattn" as `context`
and "vector" as `y`. Other keys ("c_concat", which the host's CFG denoiser adds) are ignored."""

from __future__ import annotations

import torch
from torch import nn


class IdentityWrapper(nn.Module):
    def __init__(self, diffusion_model, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, *args, **kwargs):
        return self.diffusion_model(*args, **kwargs)


class OpenAIWrapper(IdentityWrapper):
    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict, **kwargs) -> torch.Tensor:
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)
