"""Host glue: which WebUI runs the extension, detected once per load of the scripts, its host row, and
what every script does where it cannot work.

`lib_mos.hosts` has one row per host. Each supported host has a row module here,
`mos_host_<name>.py` (A1111: `mos_host_a1111`, Forge: `mos_host_forge`, Forge Classic:
`mos_host_forge_classic`), with the same functions:
`unet_of`, `embedding_names`, `embedding_widths`, `alias_embeddings`, `empty_prompt`,
`text_encoders` and `call_rows`. The other scripts reach the host's internals only through `ROW`,
so every difference between hosts is in those files.

In a host that is not supported (one we do not know) the console says so once,
every tab and the Script dropdown's panel say so in the UI, no hook is installed on the model, the
always-on script leaves generations alone, and the dropdown script refuses with the same sentence
instead of failing somewhere inside the sampler. Where generation works but a tab does not yet
(`Host.fusion_why`, `Host.training_why`), that tab says so.
"""

from __future__ import annotations

import inspect
import sys

import gradio as gr
from torch import nn

from lib_mos.files import import_sibling
from lib_mos.hosts import Host, detect, tab_message, unsupported_message

HOST: Host = detect()
SUPPORTED = HOST.supported
MESSAGE = "" if SUPPORTED else unsupported_message(HOST)
TRAINING_MESSAGE = MESSAGE or (tab_message(HOST, "training") if HOST.training_why else "")
FUSION_MESSAGE = MESSAGE or (tab_message(HOST, "fusion") if HOST.fusion_why else "")
ROW = import_sibling(__file__, f"mos_host_{HOST.name.replace('-', '_')}") if SUPPORTED else None


def unet_of(sd_model) -> nn.Module:
    """The live model's UNet module (ldm's module names in every supported host)."""
    return ROW.unet_of(sd_model)


def register(on, callback, name: str) -> None:
    """`script_callbacks.on_…(callback, name=name)` where the host names callbacks (A1111 v1.10.1 and
    Forge: for their order and error reports); Forge Classic's older `on_…` take no name."""
    if "name" in inspect.signature(on).parameters:
        on(callback, name=name)
    else:
        on(callback)


def table_rows_at_least() -> int:
    """The fewest rows a table may be built with: gradio 3.41 (A1111, Forge Classic) shows an empty
    table as none; gradio 4 (Forge) fails the whole page on a table built with none ("Cannot read
    properties of undefined (reading 'slice')", seen in the real Forge), so one empty row there."""
    return 0 if int(gr.__version__.split(".")[0]) < 4 else 1


def announce() -> None:
    """Say in the console, once per load of the scripts, that the extension is inactive here."""
    if MESSAGE:
        print(MESSAGE, file=sys.stderr)


def require_supported() -> None:
    """Refuse work the host cannot do, with the sentence the UI shows."""
    if not SUPPORTED:
        raise RuntimeError(MESSAGE)


def message_tab(title: str, elem_id: str, message: str):
    """The `on_ui_tabs` entry of a tab in a host where it does not run: the message, nothing else."""
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown(message, elem_id=f"{elem_id}_unsupported")
    return [(tab, title, elem_id)]
