"""Defaults of the page's components kept in ui-config.json (modules/ui_loadsave.py).

`ui.create_ui()` makes a `UiLoadsave(cmd_opts.ui_config_file)` (default `<data dir>/ui-config.json`)
and, after rendering each tab, calls `add_block(interface, ifid)`: every component inside the tab's
Blocks is registered under `<ifid>/<label>` (a Button without a label under `<ifid>/<button text>`, a
Tabs with an elem_id under `<ifid>/Tabs@<elem_id>`; layout blocks are walked, not registered; an
`on_ui_tabs` tab's path is the elem_id its callback gave), then the page's own tabs as
`webui/Tabs@tabs`. A script control carries `custom_script_source` (its script's file name), which
prefixes its keys with `customscript/<file>/`.

Per field the key is `<path>/<field>`: a component of exactly the types below that is visible has its
`visible`; Slider `value`, `minimum`, `maximum`, `step`; Radio `value` (only a saved value among its
choices is used); Checkbox, Textbox, Number `value`; Dropdown `value` (only values among its choices,
every one of them when multiselect; the Script dropdown's `init_field` then shows that script's
group); Tabs `selected` (an id of one of its tabs, or an index). A key the file lacks (or holds as
null) takes the component's current value; a saved value is set on the component (a Textbox gets
`str(value)`, a Number `float(value)` or nothing when that fails). A component with
`do_not_save_to_config = True` is neither read nor written. When the settings differ from the file
at the end, the whole file is written (not when the file exists but could not be read).

Not reproduced: the Settings > Defaults page (view and apply changes), ToolButton and InputAccordion
(the double has no ui_components).
"""

from __future__ import annotations

import json
import os

import gradio as gr

from modules import errors


def radio_choices(comp) -> list:
    """gradio 3.41 keeps choices as values or as (name, value) pairs: the first of each."""
    return [c[0] if isinstance(c, tuple) else c for c in getattr(comp, "choices", [])]


class UiLoadsave:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.ui_settings: dict = {}
        self.component_mapping: dict = {}
        self.error_loading = False
        self.finalized_ui = False
        try:
            self.ui_settings = self.read_from_file()
        except FileNotFoundError:
            pass
        except Exception as e:
            self.error_loading = True
            errors.display(e, "loading settings")

    def add_component(self, path: str, x) -> None:
        assert not self.finalized_ui

        def apply_field(obj, field, condition=None, init_field=None):
            key = f"{path}/{field}"
            source = getattr(obj, "custom_script_source", None)
            if source is not None:
                key = f"customscript/{source}/{key}"
            if getattr(obj, "do_not_save_to_config", False):
                return

            saved = self.ui_settings.get(key, None)
            if saved is None:
                self.ui_settings[key] = getattr(obj, field)
            elif condition and not condition(saved):
                pass
            else:
                if isinstance(obj, gr.Textbox) and field == "value":
                    saved = str(saved)
                elif isinstance(obj, gr.Number) and field == "value":
                    try:
                        saved = float(saved)
                    except ValueError:
                        return
                setattr(obj, field, saved)
                if init_field is not None:
                    init_field(saved)

            if field == "value" and key not in self.component_mapping:
                self.component_mapping[key] = obj

        kind = type(x)
        if kind in (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown, gr.Button) and x.visible:
            apply_field(x, "visible")
        if kind is gr.Slider:
            for field in ("value", "minimum", "maximum", "step"):
                apply_field(x, field)
        if kind is gr.Radio:
            apply_field(x, "value", lambda val: val in radio_choices(x))
        if kind in (gr.Checkbox, gr.Textbox, gr.Number):
            apply_field(x, "value")
        if kind is gr.Dropdown:
            def check_dropdown(val):
                choices = radio_choices(x)
                if getattr(x, "multiselect", False):
                    return all(v in choices for v in val)
                return val in choices

            apply_field(x, "value", check_dropdown, getattr(x, "init_field", None))
        if kind is gr.Tabs:
            def check_tab_id(tab_id):
                tab_items = [c for c in x.children if isinstance(c, gr.TabItem)]
                if type(tab_id) is str:
                    return tab_id in [t.id for t in tab_items]
                if type(tab_id) is int:
                    return 0 <= tab_id < len(tab_items)
                return False

            apply_field(x, "selected", check_tab_id)

    def add_block(self, x, path: str = "") -> None:
        if hasattr(x, "children"):
            if isinstance(x, gr.Tabs) and x.elem_id is not None:
                self.add_component(f"{path}/Tabs@{x.elem_id}", x)
            for child in x.children:
                self.add_block(child, path)
        elif x.label is not None:
            self.add_component(f"{path}/{x.label}", x)
        elif isinstance(x, gr.Button) and x.value is not None:
            self.add_component(f"{path}/{x.value}", x)

    def read_from_file(self) -> dict:
        with open(self.filename, encoding="utf8") as file:
            return json.load(file)

    def write_to_file(self, current_ui_settings: dict) -> None:
        with open(self.filename, "w", encoding="utf8") as file:
            json.dump(current_ui_settings, file, indent=4, ensure_ascii=False)

    def dump_defaults(self) -> None:
        """Write the settings, unless the file exists and could not be read at start."""
        if self.error_loading and os.path.exists(self.filename):
            return
        self.write_to_file(self.ui_settings)
