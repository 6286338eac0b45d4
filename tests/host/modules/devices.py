"""Device helpers as the host names them; the double runs on the CPU in float32."""

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_unet = torch.float32
dtype_vae = torch.float32
unet_needs_upcast = False


def autocast(disable: bool = False) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def without_autocast(disable: bool = False) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def torch_gc() -> None:
    pass


def cond_cast_unet(t: torch.Tensor) -> torch.Tensor:
    return t.to(dtype_unet)


def test_for_nans(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise RuntimeError(f"A tensor with NaNs was produced in {where}.")
