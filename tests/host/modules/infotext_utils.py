"""Infotext quoting and parsing, and the paste buttons that send an infotext into a tab's fields
(modules/infotext_utils.py)."""

from __future__ import annotations

import json
import os
import re
import sys

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if not text or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields: list[str] | None = None) -> dict:
    """Prompt, negative prompt and `Key: value` pairs of an infotext, values unquoted."""
    res: dict = {}
    prompt, negative_prompt = "", ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in re_param.findall(lastline):
        try:
            if v and v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"")
    for key in skip_fields or []:
        res.pop(key, None)
    return res


# --- pasting an infotext into a tab's fields (the host's paste buttons) ------------------------
reported_errors: list[str] = []


def _report(message: str) -> None:
    import traceback

    text = f"{message}\n{traceback.format_exc()}"
    reported_errors.append(text)
    print(text, file=sys.stderr)


class ParamBinding:
    def __init__(self, paste_button, tabname, source_text_component=None, source_image_component=None,
                 source_tabname=None, override_settings_component=None, paste_field_names=None):
        self.paste_button = paste_button
        self.tabname = tabname
        self.source_text_component = source_text_component
        self.source_image_component = source_image_component
        self.source_tabname = source_tabname
        self.override_settings_component = override_settings_component
        self.paste_field_names = paste_field_names or []


class PasteField(tuple):
    """(component, infotext key or function of the parsed params), with the API field name."""

    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


paste_fields: dict[str, dict] = {}
registered_param_bindings: list[ParamBinding] = []


def reset() -> None:
    paste_fields.clear()
    registered_param_bindings.clear()


def add_paste_fields(tabname: str, init_img, fields: list, override_settings_component=None) -> None:
    if fields:
        fields[:] = [f if isinstance(f, PasteField) else PasteField(*f) for f in fields]
    paste_fields[tabname] = {"init_img": init_img, "fields": fields,
                             "override_settings_component": override_settings_component}
    # extensions written for old hosts read these
    from modules import ui

    if tabname == "txt2img":
        ui.txt2img_paste_fields = fields
    elif tabname == "img2img":
        ui.img2img_paste_fields = fields


def create_buttons(tabs_list: list[str]) -> dict:
    import gradio as gr

    return {tab: gr.Button(f"Send to {tab}", elem_id=f"{tab}_tab") for tab in tabs_list}


def register_paste_params_button(binding: ParamBinding) -> None:
    registered_param_bindings.append(binding)


def connect_paste_params_buttons() -> None:
    """Wire every registered paste button: infotext into the destination tab's fields, then the
    javascript `switch_to_<tab>` in a click of its own. Image sources, copying from another tab
    (`source_tabname`) and override settings are not reproduced and are refused."""
    for binding in registered_param_bindings:
        destination = paste_fields[binding.tabname]
        fields = destination["fields"]
        if binding.source_image_component is not None and destination["init_img"] is not None:
            raise NotImplementedError("the host double does not paste images")
        if binding.source_tabname is not None and fields is not None:
            raise NotImplementedError("the host double does not copy fields between tabs")
        override = binding.override_settings_component or destination["override_settings_component"]
        if override is not None:
            raise NotImplementedError("the host double has no override settings")
        if binding.source_text_component is not None and fields is not None:
            connect_paste(binding.paste_button, fields, binding.source_text_component, None, binding.tabname)
        binding.paste_button.click(fn=None, _js=f"switch_to_{binding.tabname}", inputs=None, outputs=None,
                                   show_progress=False)


def connect_paste(button, paste_fields, input_comp, override_settings_component, tabname) -> None:
    """On click, parse the infotext in `input_comp` and send one update per paste field: a key's
    value converted to the type of the component's initial value (an int becomes a float, "False"
    a False), a function's result as it is, and no change where the infotext has nothing."""
    import gradio as gr

    from modules import paths, script_callbacks, shared

    type_of_gr_update = type(gr.update())
    if override_settings_component is not None:
        raise NotImplementedError("the host double has no override settings")

    def paste_func(prompt):
        if not prompt and not shared.cmd_opts.hide_ui_dir_config and not shared.cmd_opts.no_prompt_history:
            try:
                with open(os.path.join(paths.data_path, "params.txt"), encoding="utf8") as file:
                    prompt = file.read()
            except OSError:
                pass
        params = parse_generation_parameters(prompt)
        script_callbacks.infotext_pasted_callback(prompt, params)
        res = []
        for output, key in paste_fields:
            if callable(key):
                try:
                    v = key(params)
                except Exception:
                    _report(f"Error executing {key}")
                    v = None
            else:
                v = params.get(key, None)
            if v is None:
                res.append(gr.update())
            elif isinstance(v, type_of_gr_update):
                res.append(v)
            else:
                try:
                    valtype = type(output.value)
                    if valtype is bool and v == "False":
                        val = False
                    elif valtype is int:
                        val = float(v)
                    else:
                        val = valtype(v)
                    res.append(gr.update(value=val))
                except Exception:
                    res.append(gr.update())
        return res

    button.click(fn=paste_func, inputs=[input_comp], outputs=[x[0] for x in paste_fields], show_progress=False)
    button.click(fn=None, _js=f"recalculate_prompts_{tabname}", inputs=[], outputs=[], show_progress=False)
