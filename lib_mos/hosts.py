"""Which WebUI runs the extension: one row per host, told apart by the packages each one has.

The core never imports a host; the host layer (`scripts/mos_host.py`) asks `detect` once at start
with a probe of what the running process can import, and every script asks that layer what the
host supports. A host we know but do not support yet, or one we do not know, is a message in the
console and in the UI, never a traceback from deep inside a generation.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    """A WebUI the extension may find itself in."""

    name: str  # short, for logs and the API; also names the host row of scripts/ (`mos_host_<name>`)
    title: str  # for people
    markers: tuple[str, ...]  # modules that all import in this host (checked in `HOSTS` order)
    supported: bool  # the generation scripts (concept binding, regions) run here
    why: str = ""  # for an unsupported host: what is missing, said to the user
    training_why: str = ""  # where the training tab does not run yet (though generation does): why
    fusion_why: str = ""  # where the fusion tab does not run yet (though generation does): why


A1111 = Host("a1111", "AUTOMATIC1111 WebUI", ("modules.sd_hijack", "modules.textual_inversion.textual_inversion"),
             supported=True)
FORGE = Host("forge", "Forge", ("modules_forge", "backend"), supported=True,
             training_why="it trains the model through A1111's model objects, and its Forge path is not written "
                          "yet",
             fusion_why="its concept table does not follow a selection of several files in Forge's gradio 4 yet")
FORGE_CLASSIC = Host("forge-classic", "Forge Classic", ("modules_forge", "ldm_patched"), supported=True,
                     training_why="its UNet is `ldm_patched`'s, which the training tab has not been checked with "
                                  "yet",
                     fusion_why="the tab has not been checked in Forge Classic yet")
UNKNOWN = Host("unknown", "an unknown WebUI", (), supported=False,
               why="it has neither AUTOMATIC1111's `modules.sd_hijack` nor Forge's `modules_forge`")

HOSTS: tuple[Host, ...] = (FORGE, FORGE_CLASSIC, A1111)
"""Forge keeps most of A1111's `modules`, so the Forge rows are tried first."""


def importable(name: str) -> bool:
    """Whether `name` is imported or can be, without importing it (a parent package may be)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package, or a module without a spec
        return False


def detect(probe: Callable[[str], bool] = importable) -> Host:
    """The first row of `HOSTS` whose markers all import, else `UNKNOWN`."""
    for host in HOSTS:
        if all(probe(marker) for marker in host.markers):
            return host
    return UNKNOWN


def unsupported_message(host: Host) -> str:
    """What the console and the UI say where the extension cannot work."""
    return (f"Mix-of-Show does not run in {host.title} yet: {host.why}. Its scripts and tabs stay inactive here; "
            "the rest of the WebUI is unaffected. It works in AUTOMATIC1111's WebUI v1.10.1 and in Forge.")


def tab_message(host: Host, tab: str) -> str:
    """What the fusion or training tab (`tab`) says in a host where generation works but it does not yet."""
    why, verb = (host.fusion_why, "fuse") if tab == "fusion" else (host.training_why, "train")
    own = ", or with this host's Python from the extension's folder" if tab == "fusion" else ""
    return (f"Mix-of-Show's {tab} tab does not run in {host.title} yet: {why}. Concept tokens and the Mix-of-Show "
            f"script work here. To {verb}, use AUTOMATIC1111's WebUI v1.10.1 (its tab, or `python -m lib_mos {verb}` "
            f"with its Python{own}); the files it writes work here.")
