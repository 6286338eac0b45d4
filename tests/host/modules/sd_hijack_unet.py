"""The host's UNet patch (modules/sd_hijack_unet.py): ldm's openaimodel gets a `th` whose `cat`
resizes the upsampled tensor to its skip connection, so sizes that are multiples of 8 (not 64) work."""

from __future__ import annotations

import torch


class TorchHijackForUnet:
    def __getattr__(self, item):
        if item == "cat":
            return self.cat
        if hasattr(torch, item):
            return getattr(torch, item)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{item}'")

    def cat(self, tensors, *args, **kwargs):
        if len(tensors) == 2:
            a, b = tensors
            if a.shape[-2:] != b.shape[-2:]:
                a = torch.nn.functional.interpolate(a, b.shape[-2:], mode="nearest")
            tensors = (a, b)
        return torch.cat(tensors, *args, **kwargs)


th = TorchHijackForUnet()


def apply() -> None:
    import ldm.modules.diffusionmodules.openaimodel as openaimodel

    openaimodel.th = th


def undo() -> None:
    import ldm.modules.diffusionmodules.openaimodel as openaimodel

    openaimodel.th = torch
