"""The page the host double serves, as A1111 v1.10.1 builds it: tabs and element ids, the Script
dropdown showing the chosen script's group, infotext pasted into txt2img with the host's value
conversion, extensions' javascript and css injected; and one run in a real browser (Chromium)."""

from __future__ import annotations

import textwrap
import urllib.request

import pytest
from browser import choose_script, send_to_txt2img

EXTENSION_SCRIPT = textwrap.dedent('''
    import gradio as gr
    from modules import scripts


    class XScript(scripts.Script):
        def title(self):
            return "X script"

        def ui(self, is_img2img):
            word = gr.Textbox(label="X word", elem_id=self.elem_id("word"))
            flag = gr.Checkbox(value=True, label="X flag", elem_id=self.elem_id("flag"))
            self.infotext_fields = [(word, "X word"), (flag, "X flag")]
            return [word, flag]


    class YScript(scripts.Script):
        def title(self):
            return "Y script"

        def ui(self, is_img2img):
            steps = gr.Slider(minimum=1, maximum=9, step=1, value=2, label="Y steps", elem_id=self.elem_id("steps"))
            mode = gr.Textbox(value="calm", label="Y mode", elem_id=self.elem_id("mode"))
            self.infotext_fields = [(steps, "Y steps"), (mode, lambda d: 1 / 0 if "Y boom" in d else d.get("Y mode"))]
            return [steps, mode]
''')
EXTENSION_JS = 'onUiLoaded(() => { document.body.dataset.xLoaded = "1"; });\n'
EXTENSION_CSS = "#txt2img_prompt { outline: 3px solid rgb(1, 2, 3); }\n"
INFOTEXT = "a red cat\nNegative prompt: blurry\nSteps: 3, Size: 768x640, Script: X script, X word: hello, X flag: False"


def write_extension(root, script: str = EXTENSION_SCRIPT):
    ext = root / "extensions" / "x-ext"
    (ext / "scripts").mkdir(parents=True)
    (ext / "javascript").mkdir()
    (ext / "scripts" / "x_script.py").write_text(script)
    (ext / "javascript" / "x.js").write_text(EXTENSION_JS)
    (ext / "javascript" / "a.js").write_text("// loaded before x.js\n")
    (ext / "javascript" / "m.mjs").write_text("export {};\n")
    (ext / "style.css").write_text(EXTENSION_CSS)
    return ext


@pytest.fixture
def ui_host(tmp_path, tiny_checkpoint):
    from host_harness import HostHarness

    ext = write_extension(tmp_path)
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)])
    try:
        yield harness, ext
    finally:
        harness.close()


def component(blocks, elem_id):
    found = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, f"{elem_id}: {len(found)} elements"
    return found[0]


def descendants(block) -> list:
    found = []
    for child in getattr(block, "children", []):
        found += [child, *descendants(child)]
    return found


def handlers(blocks, target) -> list:
    """(dependency, fn) of every event on `target`, in the order they were attached."""
    return [(d, blocks.fns[i].fn) for i, d in enumerate(blocks.dependencies) if target._id in d["targets"]]


def outputs_by_id(blocks, dependency, values) -> dict:
    return dict(zip(dependency["outputs"], values, strict=True))


def test_create_ui_builds_the_host_page(ui_host):
    import gradio as gr

    harness, _ = ui_host
    blocks = harness.blocks
    assert blocks.title == "Stable Diffusion" and not blocks.analytics_enabled
    assert blocks.theme._stylesheets == []  # system fonts only: the page links no web fonts
    tabs = component(blocks, "tabs")
    assert [(c.id, c.elem_id) for c in tabs.children] == [
        ("txt2img", "tab_txt2img"), ("img2img", "tab_img2img"), ("pnginfo", "tab_pnginfo")]
    for elem_id in ("txt2img_prompt", "txt2img_neg_prompt", "img2img_prompt", "pnginfo_generation_info"):
        assert isinstance(component(blocks, elem_id), gr.Textbox)
    assert isinstance(component(blocks, "txt2img_generate"), gr.Button)
    for elem_id in ("txt2img_width", "txt2img_height"):
        slider = component(blocks, elem_id)
        assert (slider.minimum, slider.maximum, slider.step, slider.value) == (64, 2048, 8, 512)
    container = component(blocks, "txt2img_script_container")
    # as in the host, txt2img and img2img each have a Script dropdown with this id
    dropdowns = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "script_list"]
    assert len(dropdowns) == 2 and harness.scripts.inputs[0] in dropdowns
    dropdown = harness.scripts.inputs[0]
    assert dropdown.choices == ["None", "X script", "Y script"]
    inside = descendants(container)
    x, y = harness.scripts.selectable_scripts
    assert dropdown in inside and x.group in inside and y.controls[0] in inside
    assert not x.group.visible and not y.group.visible
    assert harness.scripts.inputs[0] is dropdown
    # Generate submits every script control, as in the host: gradio renders them editable for that
    (generate, _), = handlers(blocks, component(blocks, "txt2img_generate"))
    assert generate["inputs"][-len(harness.scripts.inputs):] == [c._id for c in harness.scripts.inputs]
    assert generate["outputs"] == [component(blocks, e)._id for e in (
        "txt2img_gallery", "generation_info_txt2img", "html_info_txt2img", "html_log_txt2img")]


def test_generate_runs_txt2img_with_the_page_values(ui_host):
    import json

    harness, _ = ui_host
    (_, generate), = handlers(harness.blocks, component(harness.blocks, "txt2img_generate"))
    images, info, infotext, log = generate("a cat", "blurry", 72, 64, *harness.scripts.default_args())
    assert [im.size for im in images] == [(64, 72)]
    assert json.loads(info)["infotexts"][0].startswith("a cat\nNegative prompt: blurry\nSteps: 20")
    assert infotext.startswith("<p>a cat<br>") and "Time taken" in log


def test_extension_tabs_follow_the_builtin_tabs(tmp_path, tiny_checkpoint):
    from host_harness import HostHarness

    ext = write_extension(tmp_path, EXTENSION_SCRIPT + textwrap.dedent('''
        from modules import script_callbacks


        def tab():
            with gr.Blocks() as block:
                gr.Markdown("x tab")
            return [(block, "X tab", "x_tab")]


        script_callbacks.on_ui_tabs(tab)
    '''))
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)])
    try:
        assert [(title, elem_id) for _, title, elem_id in harness.ui_tabs] == [("X tab", "x_tab")]
        assert [c.elem_id for c in component(harness.blocks, "tabs").children] == [
            "tab_txt2img", "tab_img2img", "tab_pnginfo", "tab_x_tab"]
    finally:
        harness.close()


def test_script_dropdown_shows_the_chosen_scripts_group(ui_host):
    harness, _ = ui_host
    dropdown = harness.scripts.inputs[0]
    (change, select_script), = handlers(harness.blocks, dropdown)
    assert change["trigger"] == "change"
    assert change["outputs"] == [s.group._id for s in harness.scripts.selectable_scripts]
    assert [u["visible"] for u in select_script(2)] == [False, True]
    assert [u["visible"] for u in select_script(1)] == [True, False]
    assert [u["visible"] for u in select_script(0)] == [False, False]
    assert [u["visible"] for u in select_script(None)] == [False, False]


def test_single_dropdown_script_gets_a_single_update(tmp_path, tiny_checkpoint):
    from host_harness import HostHarness

    ext = write_extension(tmp_path, EXTENSION_SCRIPT.split("class YScript")[0])
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)])
    try:
        (_, select_script), = handlers(harness.blocks, harness.scripts.inputs[0])
        assert select_script(1)["visible"] is True and select_script(0)["visible"] is False
    finally:
        harness.close()


def test_send_to_txt2img_pastes_like_the_host(ui_host):
    import gradio as gr

    from modules import infotext_utils, script_callbacks

    harness, _ = ui_host
    blocks = harness.blocks
    button = component(blocks, "txt2img_tab")
    (paste, paste_func), (recalc, _), (switch, _) = handlers(blocks, button)
    assert paste["inputs"] == [component(blocks, "pnginfo_generation_info")._id]
    assert (paste["js"], recalc["js"], switch["js"]) == (None, "recalculate_prompts_txt2img", "switch_to_txt2img")
    seen = []
    script_callbacks.on_infotext_pasted(lambda text, params: seen.append(dict(params)))

    out = outputs_by_id(blocks, paste, paste_func(INFOTEXT))
    x, y = harness.scripts.selectable_scripts
    assert seen and seen[0]["Size-1"] == "768"
    width, height = out[component(blocks, "txt2img_width")._id], out[component(blocks, "txt2img_height")._id]
    assert width["value"] == 768.0 and type(width["value"]) is float and height["value"] == 640.0
    assert out[component(blocks, "txt2img_prompt")._id]["value"] == "a red cat"
    assert out[component(blocks, "txt2img_neg_prompt")._id]["value"] == "blurry"
    assert out[harness.scripts.inputs[0]._id]["value"] == "X script"
    assert out[x.group._id]["visible"] is True and out[y.group._id]["visible"] is False
    assert out[x.controls[0]._id]["value"] == "hello"
    assert out[x.controls[1]._id]["value"] is False  # "False" into a checkbox
    assert out[y.controls[0]._id] == gr.update()  # absent key: no change

    out = outputs_by_id(blocks, paste, paste_func("a dog\nSteps: 3, Size: 64x72, Y steps: 7, Y boom: 1"))
    assert out[y.controls[0]._id]["value"] == 7.0
    assert out[y.controls[1]._id] == gr.update()  # a paste function that raises is reported: no change
    assert any("Error executing" in e and "ZeroDivisionError" in e for e in infotext_utils.reported_errors)
    assert out[harness.scripts.inputs[0]._id]["value"] == "None"
    assert out[x.group._id]["visible"] is False and out[y.group._id]["visible"] is False


def test_javascript_and_css_are_injected_in_order(ui_host):
    import gradio as gr

    from modules import ui_gradio_extensions

    harness, ext = ui_host
    head = ui_gradio_extensions.javascript_html()
    order = [head.index(name) for name in ("script.js?", "a.js?", "x.js?", "m.mjs?")]
    assert order == sorted(order)
    assert '<script type="module" src="file=' in head and str(ext / "javascript" / "x.js") in head
    assert str(ext / "style.css") in ui_gradio_extensions.css_html()

    original = gr.routes.templates.TemplateResponse
    url = harness.serve()
    assert gr.routes.templates.TemplateResponse != original
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    assert page.index("x.js?") < page.index("</head>") < page.index("style.css?") < page.index("</body>")
    src = page.split('src="')[1:]
    js_url = next(s.split('"')[0] for s in src if "x.js?" in s)
    assert urllib.request.urlopen(url + js_url, timeout=10).read().decode() == EXTENSION_JS
    harness.close()
    assert gr.routes.templates.TemplateResponse == original
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_page_in_a_browser(ui_host, browser_page):
    """Chromium: no console errors, the extension's javascript and css are live, the Script dropdown
    shows the chosen group, and PNG Info's "Send to txt2img" fills txt2img and switches to it."""
    harness, _ = ui_host
    page = browser_page.page
    page.set_default_timeout(10_000)
    page.goto(harness.serve())
    page.wait_for_function("document.body.dataset.xLoaded === '1'")  # onUiLoaded fired
    assert page.evaluate("getComputedStyle(gradioApp().querySelector('#txt2img_prompt')).outlineColor") == \
        "rgb(1, 2, 3)"
    assert page.evaluate("get_uiCurrentTab().textContent.trim()") == "txt2img"
    x_group = "#script_txt2img_x_script_word"

    assert page.is_hidden(x_group)
    choose_script(page, "X script")
    page.wait_for_selector(x_group, state="visible")
    assert page.is_editable(f"{x_group} textarea")
    choose_script(page, "None")
    page.wait_for_selector(x_group, state="hidden")

    send_to_txt2img(page, INFOTEXT)  # waits for the PNG Info tab before pasting
    page.wait_for_function("gradioApp().querySelector('#txt2img_width input[type=number]').value === '768'")
    page.wait_for_selector(x_group, state="visible")
    state = page.evaluate("""() => {
        const value = (selector) => gradioApp().querySelector(selector).value;
        return {
            tab: get_uiCurrentTab().textContent.trim(),
            content: get_uiCurrentTabContent().id,
            width: value('#txt2img_width input[type=range]'),
            height: [value('#txt2img_height input[type=number]'), value('#txt2img_height input[type=range]')],
            prompt: value('#txt2img_prompt textarea'),
            word: value('#script_txt2img_x_script_word textarea'),
            script: value('#script_list input'),
        };
    }""")
    assert state == {"tab": "txt2img", "content": "tab_txt2img", "width": "768", "height": ["640", "640"],
                     "prompt": "a red cat", "word": "hello", "script": "X script"}
    harness.wait_idle()  # the dropdown's change after the paste: let it end before the browser leaves
    assert browser_page.errors == []
    assert not [u for u in browser_page.external_requests if "font" in u]
