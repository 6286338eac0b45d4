"""Callback registry of the host (modules/script_callbacks.py).

As in the host, registrations are permanent, a callback that raises is reported and the others
still run, and callbacks are identified by the file that registered them.
"""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_CATEGORIES = (
    "app_started", "model_loaded", "ui_tabs", "ui_settings", "cfg_denoiser", "cfg_denoised",
    "cfg_after_cfg", "script_unloaded", "before_ui", "infotext_pasted", "before_image_saved",
    "image_saved",
)


@dataclass
class ScriptCallback:
    script: str
    callback: Callable
    name: str


callback_map: dict[str, list[ScriptCallback]] = {f"callbacks_{c}": [] for c in _CATEGORIES}


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


reported_errors: list[str] = []
"""Every exception a callback raised, as the host would print it (tests read this)."""


def report_exception(c: ScriptCallback, job: str) -> None:
    text = f"Error executing callback {job} for {c.script}\n{traceback.format_exc()}"
    reported_errors.append(text)
    print(text, file=sys.stderr)


def _caller_file() -> str:
    stack = [x for x in inspect.stack() if x.filename != __file__]
    return stack[0].filename if stack else "unknown file"


def add_callback(callbacks: list[ScriptCallback], fun: Callable, *, name: str | None = None,
                 category: str = "unknown", filename: str | None = None) -> None:
    filename = filename or _caller_file()
    base = f"{os.path.basename(filename)}/{category}" + (f"/{name}" if name else "")
    unique = base
    for index in range(1000):
        if not any(x.name == unique for x in callbacks):
            break
        unique = f"{base}-{index + 1}"
    callbacks.append(ScriptCallback(filename, fun, unique))


def _fire(category: str, *args: Any) -> list[Any]:
    results = []
    for c in list(callback_map[f"callbacks_{category}"]):
        try:
            results.append(c.callback(*args))
        except Exception:
            report_exception(c, f"{category}_callback")
    return results


def clear_callbacks() -> None:
    for callback_list in callback_map.values():
        callback_list.clear()


def remove_current_script_callbacks() -> None:
    filename = _caller_file()
    if filename == "unknown file":
        return
    for callback_list in callback_map.values():
        callback_list[:] = [cb for cb in callback_list if cb.script != filename]


def remove_callbacks_for_function(callback_func: Callable) -> None:
    for callback_list in callback_map.values():
        callback_list[:] = [cb for cb in callback_list if cb.callback != callback_func]


# --- firing ------------------------------------------------------------------------------------
def app_started_callback(demo: Any, app: Any) -> None:
    _fire("app_started", demo, app)


def model_loaded_callback(sd_model: Any) -> None:
    _fire("model_loaded", sd_model)


def ui_tabs_callback() -> list:
    res: list = []
    for tabs in _fire("ui_tabs"):
        res += tabs or []
    return res


def ui_settings_callback() -> None:
    _fire("ui_settings")


def cfg_denoiser_callback(params: CFGDenoiserParams) -> None:
    _fire("cfg_denoiser", params)


def cfg_denoised_callback(params: CFGDenoisedParams) -> None:
    _fire("cfg_denoised", params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams) -> None:
    _fire("cfg_after_cfg", params)


def script_unloaded_callback() -> None:
    _fire("script_unloaded")


def before_ui_callback() -> None:
    _fire("before_ui")


def infotext_pasted_callback(infotext: str, params: dict[str, Any]) -> None:
    _fire("infotext_pasted", infotext, params)


# --- registration --------------------------------------------------------------------------------
def _register(category: str, callback: Callable, name: str | None) -> None:
    add_callback(callback_map[f"callbacks_{category}"], callback, name=name, category=category,
                 filename=_caller_file())


def on_app_started(callback: Callable, *, name: str | None = None) -> None:
    _register("app_started", callback, name)


def on_model_loaded(callback: Callable, *, name: str | None = None) -> None:
    _register("model_loaded", callback, name)


def on_ui_tabs(callback: Callable, *, name: str | None = None) -> None:
    _register("ui_tabs", callback, name)


def on_ui_settings(callback: Callable, *, name: str | None = None) -> None:
    _register("ui_settings", callback, name)


def on_cfg_denoiser(callback: Callable, *, name: str | None = None) -> None:
    _register("cfg_denoiser", callback, name)


def on_cfg_denoised(callback: Callable, *, name: str | None = None) -> None:
    _register("cfg_denoised", callback, name)


def on_cfg_after_cfg(callback: Callable, *, name: str | None = None) -> None:
    _register("cfg_after_cfg", callback, name)


def on_script_unloaded(callback: Callable, *, name: str | None = None) -> None:
    _register("script_unloaded", callback, name)


def on_before_ui(callback: Callable, *, name: str | None = None) -> None:
    _register("before_ui", callback, name)


def on_infotext_pasted(callback: Callable, *, name: str | None = None) -> None:
    _register("infotext_pasted", callback, name)
