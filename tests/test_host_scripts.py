"""Script loading and hook routing in the host double, as in A1111 v1.10.1: dropdown scripts get
`ui` and `run` only, AlwaysVisible scripts get the processing hooks, `basedir()` is the extension
folder at import time, and the UI layout decides the script_args slices."""

from __future__ import annotations

import textwrap

import pytest

EXTENSION_SCRIPT = textwrap.dedent('''
    import gradio as gr
    from modules import processing, script_callbacks, scripts

    CALLS = []
    BASEDIR = scripts.basedir()


    class Dropdown(scripts.Script):
        def title(self):
            return "Double dropdown"

        def ui(self, is_img2img):
            return [gr.Textbox(value="x", label="word"), gr.Slider(value=2, minimum=0, maximum=4, label="n")]

        def process(self, p, *args):
            CALLS.append(("dropdown.process", args))

        def run(self, p, word, n):
            CALLS.append(("dropdown.run", word, n))
            p.extra_generation_params["Double word"] = word
            return processing.process_images(p)


    class Always(scripts.Script):
        def title(self):
            return "Double always"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            return [gr.Checkbox(value=False, label="on")]

        def process(self, p, on):
            CALLS.append(("always.process", on))

        def process_batch(self, p, on, **kwargs):
            CALLS.append(("always.process_batch", on, kwargs["batch_number"]))

        def postprocess(self, p, processed, on):
            CALLS.append(("always.postprocess", on, len(processed.images)))


    def tab():
        with gr.Blocks() as block:
            gr.Markdown("double tab")
        return [(block, "Double tab", "double_tab")]


    script_callbacks.on_ui_tabs(tab)
''')


@pytest.fixture
def host_with_extension(tmp_path, tiny_checkpoint):
    from host_harness import HostHarness

    ext = tmp_path / "extensions" / "double-ext"
    (ext / "scripts").mkdir(parents=True)
    (ext / "scripts" / "double_script.py").write_text(EXTENSION_SCRIPT)
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)])
    try:
        yield harness, ext
    finally:
        harness.close()


def test_dropdown_and_alwaysvisible_routing(host_with_extension):
    from modules import scripts

    host, ext = host_with_extension
    module = scripts.scripts_data[0].module
    assert str(ext) == module.BASEDIR
    assert [s.title() for s in host.scripts.selectable_scripts] == ["Double dropdown"]
    assert [s.title() for s in host.scripts.alwayson_scripts] == ["Double always"]

    args = host.script_args("Double dropdown", "hello", 3)
    always = host.scripts.alwayson_scripts[0]
    args[always.args_from] = True
    res = host.txt2img("a cat", script_args=args, batch_size=1, n_iter=2)
    assert len(res.images) == 2 and "Double word: hello" in res.info
    assert module.CALLS == [("dropdown.run", "hello", 3), ("always.process", True), ("always.process_batch", True, 0),
                            ("always.process_batch", True, 1), ("always.postprocess", True, 2)]


def test_no_script_selected_runs_plain_generation(host_with_extension):
    from modules import scripts

    host, _ = host_with_extension
    module = scripts.scripts_data[0].module
    module.CALLS.clear()
    res = host.txt2img("a cat")
    assert len(res.images) == 1
    assert [c[0] for c in module.CALLS] == ["always.process", "always.process_batch", "always.postprocess"]


def test_ui_tabs_callback_collects_tabs(host_with_extension):
    host, _ = host_with_extension
    assert [(title, elem_id) for _, title, elem_id in host.ui_tabs] == [("Double tab", "double_tab")]


def test_infotext_quotes_values_with_commas_and_parses_back(host):
    from modules import infotext_utils

    res = host.txt2img("a cat", steps=1)
    p = infotext_utils.parse_generation_parameters(res.info)
    assert p["Prompt"] == "a cat" and p["Steps"] == "1" and p["Size-1"] == "64"
    value = '{"regions": [{"prompt": "a, b: c"}]}'
    text = f"a cat\nSteps: 1, Sampler: Euler, Regions: {infotext_utils.quote(value)}"
    assert infotext_utils.parse_generation_parameters(text)["Regions"] == value


def test_extension_folder_leaves_sys_path_after_import(host_with_extension):
    import sys

    _, ext = host_with_extension
    assert str(ext) not in sys.path


def test_this_extension_loads_in_the_host(tmp_path, tiny_checkpoint):
    """The repository itself, loaded as an extension: every scripts/*.py imports cleanly with the
    host's sys.path rules."""
    from pathlib import Path

    from host_harness import HostHarness

    from modules import scripts

    root = Path(__file__).resolve().parents[1]
    harness = HostHarness(tmp_path, tiny_checkpoint, extensions=[str(root)])
    try:
        assert scripts.reported_errors == []
    finally:
        harness.close()
