"""Scripts (modules/scripts.py): the Script base class, loading `scripts/*.py` of an extension
as top-level modules, the script runner with its dropdown and argument layout.

As in the host, `process`, `process_batch`, `before_hr`, `postprocess`... reach AlwaysVisible
scripts only; a dropdown script gets `ui` and `run`, and an error in a hook is reported, not raised.
In the UI, the Script dropdown shows the chosen script's group, and an infotext's `Script` key
selects it when pasted. `list_scripts` / `list_files_with_name` find the files the page links
(`javascript/*.js`, `style.css`) in the host root and the loaded extensions.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import traceback
from collections import namedtuple

from modules import paths

AlwaysVisible = object()


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def elem_id(self, item_id):
        """As the host builds it: the tab name only for a script shown on both tabs (or neither), the
        title lower-cased with whitespace as `_` and everything but `[a-z_0-9]` dropped."""
        need_tabname = self.show(True) == self.show(False)
        tabname = ("img2img_" if self.is_img2img else "txt2img_") if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


current_basedir = paths.script_path


def basedir():
    """The extension folder of the script being loaded (only meaningful at import time)."""
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list[ScriptClassData] = []
reported_errors: list[str] = []


def report(message: str) -> None:
    text = f"{message}\n{traceback.format_exc()}"
    reported_errors.append(text)
    print(text, file=sys.stderr)


extension_paths: list[str] = []
"""The extension folders of the last `load_scripts`, in order (the host's `extensions.active()`)."""


def list_scripts(scriptdirname: str, extension: str) -> list[ScriptFile]:
    """Files `scriptdirname/*<extension>` of the host root, then of each extension, each folder sorted
    by file name (the host's order when no extension declares dependencies in metadata.ini)."""
    found = []
    for base in [paths.script_path, *extension_paths]:
        folder = os.path.join(base, scriptdirname)
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            path = os.path.join(folder, filename)
            if os.path.splitext(filename)[1].lower() == extension and os.path.isfile(path):
                found.append(ScriptFile(base, filename, path))
    return found


def list_files_with_name(filename: str) -> list[str]:
    """`filename` in the host root and in each extension folder, where it exists."""
    found = []
    for base in [paths.script_path, *extension_paths]:
        path = os.path.join(base, filename)
        if os.path.isdir(base) and os.path.isfile(path):
            found.append(path)
    return found


def load_scripts(extension_dirs: list[str]) -> None:
    """Import every `scripts/*.py` of the given extensions, each as a top-level module named after
    the file, with the extension folder first on sys.path during the import, as the host does."""
    global current_basedir
    scripts_data.clear()
    extension_paths[:] = [os.path.abspath(d) for d in extension_dirs]
    for ext_dir in extension_dirs:
        folder = os.path.join(ext_dir, "scripts")
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            path = os.path.join(folder, filename)
            if not filename.endswith(".py") or not os.path.isfile(path):
                continue
            saved_path = sys.path
            sys.path = [ext_dir, *sys.path]
            current_basedir = ext_dir
            try:
                # the host names the module after the file, extension included (script_loading.load_module)
                spec = importlib.util.spec_from_file_location(filename, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                for obj in vars(module).values():
                    if isinstance(obj, type) and issubclass(obj, Script) and obj is not Script:
                        scripts_data.append(ScriptClassData(obj, path, ext_dir, module))
            except Exception:
                report(f"Error loading script: {filename}")
            finally:
                # as in the host, the extension folder is on sys.path only while its file imports:
                # a package imported lazily later (inside a function) is not found
                sys.path = saved_path
                current_basedir = paths.script_path


class ScriptRunner:
    def __init__(self):
        self.scripts: list[Script] = []
        self.selectable_scripts: list[Script] = []
        self.alwayson_scripts: list[Script] = []
        self.titles: list[str] = []
        self.title_map: dict[str, Script] = {}
        self.infotext_fields: list = []
        self.paste_field_names: list = []
        self.inputs: list = [None]

    def initialize_scripts(self, is_img2img: bool) -> None:
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility is AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script: Script) -> None:
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        try:
            controls = script.ui(script.is_img2img)
        except Exception:
            report(f"Error creating UI for {script.filename}: ")
            return
        script.controls = controls
        if controls is None:
            return
        script.name = script.title().lower()
        for control in controls:
            # ui-config.json keys of a script's controls start with customscript/<file name>/
            control.custom_script_source = os.path.basename(script.filename)
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names
        self.inputs += controls
        script.args_to = len(self.inputs)

    def prepare_ui(self) -> None:
        self.inputs = [None]

    def setup_ui_for_section(self, section, scriptlist: list[Script] | None = None) -> None:
        import gradio as gr

        if scriptlist is None:
            scriptlist = self.alwayson_scripts
        for script in scriptlist:
            if script.alwayson and script.section != section:
                continue
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def setup_ui(self) -> list:
        """Build every script's UI inside the caller's gradio Blocks; inputs[0] is the dropdown.

        As in the host: choosing a script in the dropdown shows its group and hides the others, and
        pasting an infotext selects the script named by its `Script` key."""
        import gradio as gr

        self.inputs = [None]
        self.title_map = {s.title().lower(): s for s in self.scripts}
        self.titles = [s.title() for s in self.selectable_scripts]
        self.setup_ui_for_section(None)
        dropdown = gr.Dropdown(label="Script", elem_id="script_list", choices=["None", *self.titles],
                               value="None", type="index")
        self.inputs[0] = dropdown
        self.setup_ui_for_section(None, self.selectable_scripts)

        def select_script(script_index):
            chosen = self.selectable_scripts[script_index - 1] if script_index else None
            updates = [gr.update(visible=s is chosen) for s in self.selectable_scripts]
            # The host always has its three built-in dropdown scripts, so this event has several
            # outputs; gradio takes a function's result for a single output as that output's value,
            # so with one dropdown script (only possible here) its update goes alone.
            return updates[0] if len(updates) == 1 else updates

        def init_field(title):
            """a value from ui-config.json shows that script's group at start"""
            if title != "None":
                self.selectable_scripts[self.titles.index(title)].group.visible = True

        dropdown.init_field = init_field
        dropdown.change(fn=select_script, inputs=[dropdown],
                        outputs=[s.group for s in self.selectable_scripts])

        # the host walks the dropdown scripts' groups in order with one counter shared by all
        # pastes: the group whose position equals the counter is shown, then the counter moves on
        self.script_load_ctr = 0

        def onload_script_visibility(params):
            title = params.get("Script", None)
            if not title:
                return gr.update(visible=False)
            if title not in self.titles:
                params["Script"] = None
                message = f'Cannot find Script: "{title}"'
                print(message)
                gr.Warning(message)
                return gr.update(visible=False)
            shown = self.titles.index(title) == self.script_load_ctr
            self.script_load_ctr = (self.script_load_ctr + 1) % len(self.titles)
            return gr.update(visible=shown)

        self.infotext_fields.append((dropdown, lambda x: gr.update(value=x.get("Script", "None"))))
        self.infotext_fields.extend((s.group, onload_script_visibility) for s in self.selectable_scripts)
        return self.inputs

    def script(self, title: str) -> Script | None:
        return self.title_map.get(title.lower())

    def default_args(self) -> list:
        """What the UI submits with every control at its initial value and no script selected."""
        return [0] + [getattr(c, "value", None) for c in self.inputs[1:]]

    def run(self, p, *args):
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        return script.run(p, *args[script.args_from:script.args_to])

    def _each(self, method: str, p, *extra, **kwargs) -> None:
        for script in self.alwayson_scripts:
            if getattr(type(script), method) is getattr(Script, method):
                continue
            try:
                getattr(script, method)(p, *extra, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception:
                report(f"Error running {method}: {script.filename}")

    def setup_scrips(self, p, *, is_ui=True):
        for script in self.alwayson_scripts:
            if not is_ui and script.setup_for_ui_only:
                continue
            if type(script).setup is Script.setup:
                continue
            try:
                script.setup(p, *p.script_args[script.args_from:script.args_to])
            except Exception:
                report(f"Error running setup: {script.filename}")

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, **kwargs, images=images)

    def postprocess_batch_list(self, p, pp, **kwargs):
        self._each("postprocess_batch_list", p, pp, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)

    def before_hr(self, p):
        self._each("before_hr", p)

    def after_extra_networks_activate(self, p, **kwargs):
        self._each("after_extra_networks_activate", p, **kwargs)


scripts_txt2img: ScriptRunner | None = None
scripts_img2img: ScriptRunner | None = None


def create_script_runners() -> None:
    """One runner per tab, each with its own script instances: a script is in a tab's runner when its
    `show(is_img2img)` says so (the host initializes them as it builds each tab)."""
    global scripts_txt2img, scripts_img2img
    scripts_txt2img = ScriptRunner()
    scripts_txt2img.initialize_scripts(is_img2img=False)
    scripts_img2img = ScriptRunner()
    scripts_img2img.initialize_scripts(is_img2img=True)


