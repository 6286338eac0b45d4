"""Device helpers as the host names them (modules/devices.py). The double computes on the CPU in
float32; `devices.device` is where the host keeps what it hands around (textual-inversion
vectors, conds), and `fake_accelerator()` makes that a CUDA device that is not the CPU, so that
an extension which leaves a tensor on the CPU fails here the way it fails on users' GPUs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

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


# ------------------------------------------------------------------------------ fake accelerator
FAKE_ACCELERATOR = torch.device("cuda", 0)


class OnAccelerator(torch.Tensor):
    """A CPU tensor that was moved to the fake accelerator: it reports that device, and so do the
    results of operations on it (torch's default subclass propagation) until it is moved back.
    The double computes on the CPU; `require_on_device` is where the host's device is checked."""


def _as_device(value) -> torch.device | None:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    if isinstance(value, torch.Tensor):
        return FAKE_ACCELERATOR if isinstance(value, OnAccelerator) else value.device
    return None


_DEVICE_GETTER = torch.Tensor.device.__get__


class _Accelerator(TorchFunctionMode):
    """Turns moves to `cuda` into moves to the CPU that are remembered, and `.device` of such a
    tensor into `cuda:0`; everything else runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == _DEVICE_GETTER:  # a new method-wrapper object each time: compare, not `is`
            return FAKE_ACCELERATOR if isinstance(args[0], OnAccelerator) else func(*args)
        if func is torch.Tensor.cuda:
            return _mark(args[0].clone())
        target = None
        if func is torch.Tensor.to:
            args = list(args)
            for i, value in enumerate(args[1:], start=1):
                found = _as_device(value)
                if found is not None:
                    target, args[i] = found, (cpu if found.type == "cuda" else value)
                    break
            if "device" in kwargs:
                target = _as_device(kwargs["device"])
                kwargs["device"] = cpu if target is not None and target.type == "cuda" else kwargs["device"]
            if target is None:  # a dtype-only move keeps the tensor where it is
                target = _as_device(args[0])
        elif "device" in kwargs and (found := _as_device(kwargs["device"])) is not None:  # factories
            target, kwargs["device"] = found, (cpu if found.type == "cuda" else kwargs["device"])
        out = func(*args, **kwargs)
        if target is None or not isinstance(out, torch.Tensor):
            return out
        return _mark(out) if target.type == "cuda" else out.as_subclass(torch.Tensor)


def _mark(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, OnAccelerator) else t.as_subclass(OnAccelerator)


def device_of(t: torch.Tensor) -> torch.device:
    return FAKE_ACCELERATOR if isinstance(t, OnAccelerator) else t.device


def require_on_device(t: torch.Tensor, what: str, want_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What the host's own tensors meet in an op on `devices.device`: another device fails like
    torch fails on CUDA; another dtype is refused (the host hands these around in `want_dtype`).
    Returns the tensor as a plain CPU tensor to compute with."""
    if device_of(t) != device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{device} and {device_of(t)}! ({what})")
    if want_dtype is not None and t.dtype != want_dtype:
        raise RuntimeError(f"{what}: expected dtype {want_dtype}, got {t.dtype}")
    return t.as_subclass(torch.Tensor) if isinstance(t, OnAccelerator) else t


@contextlib.contextmanager
def fake_accelerator() -> Iterator[torch.device]:
    """`devices.device` is `cuda:0` while the work stays on the CPU: moves to it are remembered and
    `require_on_device` refuses tensors left on the CPU."""
    global device
    saved = device
    device = FAKE_ACCELERATOR
    try:
        with _Accelerator():
            yield device
    finally:
        device = saved
