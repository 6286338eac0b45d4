"""Host glue: which WebUI runs the extension, detected once per load of the scripts, and what every
script does where it cannot work.

`lib_mos.hosts` has one row per host. In a host that is not supported (Forge, Forge Classic, or
one we do not know) the console says so once, every tab and the Script dropdown's panel say so in
the UI, no hook is installed on the model, the always-on script leaves generations alone, and the
dropdown script refuses with the same sentence instead of failing somewhere inside the sampler.
"""

from __future__ import annotations

import sys

import gradio as gr
from torch import nn

from lib_mos.hosts import Host, detect, unsupported_message

HOST: Host = detect()
SUPPORTED = HOST.supported
MESSAGE = "" if SUPPORTED else unsupported_message(HOST)


def unet_of(sd_model) -> nn.Module:
    """The live model's UNet module (ldm's `UNetModel`): in A1111 v1.10.1 inside the model's
    wrapper, `sd_model.model.diffusion_model`. (Forge keeps it behind its UNet patcher,
    `forge_objects.unet.model.diffusion_model`: docs/forge.md.)"""
    return sd_model.model.diffusion_model


def announce() -> None:
    """Say in the console, once per load of the scripts, that the extension is inactive here."""
    if MESSAGE:
        print(MESSAGE, file=sys.stderr)


def require_supported() -> None:
    """Refuse work the host cannot do, with the sentence the UI shows."""
    if not SUPPORTED:
        raise RuntimeError(MESSAGE)


def message_tab(title: str, elem_id: str):
    """The `on_ui_tabs` entry of a tab in a host that is not supported: the message, nothing else."""
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown(MESSAGE, elem_id=f"{elem_id}_unsupported")
    return [(tab, title, elem_id)]
