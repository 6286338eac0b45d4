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


def test_generate_box_interrupt_and_skip_like_the_host(ui_host):
    from modules import shared

    harness, _ = ui_host
    blocks = harness.blocks
    for tab in ("txt2img", "img2img"):
        box = [c.elem_id for c in component(blocks, f"{tab}_generate_box").children]
        assert box == [f"{tab}_interrupt", f"{tab}_skip", f"{tab}_interrupting", f"{tab}_generate"]
        (interrupt, interrupt_fn), = handlers(blocks, component(blocks, f"{tab}_interrupt"))
        (_, interrupting_fn), = handlers(blocks, component(blocks, f"{tab}_interrupting"))
        (_, skip_fn), = handlers(blocks, component(blocks, f"{tab}_skip"))
        assert interrupt["js"] == f'function(){{ showSubmitInterruptingPlaceholder("{tab}"); }}'
        state = shared.state
        for fn in (interrupt_fn, interrupting_fn):
            state.begin()
            state.job_count = 2  # more than one job: stop after this one, a second click stops now
            fn()
            assert state.stopping_generation and not state.interrupted
            fn()
            assert state.interrupted
            state.begin()
            state.job_count = 1
            fn()
            assert state.interrupted and not state.stopping_generation
        state.begin()
        skip_fn()
        assert state.skipped
        state.end()


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


EXTENSION_TAB = textwrap.dedent('''
    import threading

    import gradio as gr
    from modules import call_queue, script_callbacks, shared

    GATE = threading.Event()
    REACHED = threading.Event()
    PICK = ["b"]


    def fuse(id_task, word):
        state = shared.state
        state.job_count, state.sampling_steps, state.sampling_step = 1, 4, 2
        state.textinfo = "Fusing " + word
        REACHED.set()
        GATE.wait(30)
        return f"<p id='x_done'>{id_task} {word}</p>", ""


    def tab():
        with gr.Blocks(analytics_enabled=False) as block:
            dummy = gr.Label(visible=False)
            word = gr.Textbox(value="cats", label="X word", elem_id="x_word")
            pick = gr.Dropdown(choices=["a", "b", "c"], value=lambda: PICK[0], label="X pick", elem_id="x_pick")
            gr.Number(value=3, label="X count", elem_id="x_count")
            secret = gr.Textbox(value="fresh", label="X secret", elem_id="x_secret")
            secret.do_not_save_to_config = True
            gr.Radio(choices=["slow", "fast"], value="slow", label="X mode", elem_id="x_mode")
            gr.Slider(minimum=0, maximum=1, step=0.1, value=0.5, label="X strength", elem_id="x_strength")
            start = gr.Button("Start", elem_id="x_start")
            with gr.Group(elem_id="x_panel"):
                result = gr.HTML(elem_id="x_result")
                log = gr.HTML(elem_id="x_log")
            start.click(fn=call_queue.wrap_gradio_gpu_call(fuse, extra_outputs=[None]), _js="x_submit",
                        inputs=[dummy, word], outputs=[result, log])
            pick.change(fn=None, inputs=[], outputs=[])
        return [(block, "X tab", "x_tab")]


    script_callbacks.on_ui_tabs(tab)
''')
# what the host's Checkpoint Merger does (javascript/ui.js `modelmerger`): a task id, a progress bar
# over the panel, the id as the first argument
EXTENSION_TAB_JS = textwrap.dedent('''
    function x_submit() {
        const id = randomId();
        requestProgress(id, gradioApp().getElementById("x_panel"), null, () => {
            document.body.dataset.xEnded = id;
        });
        const res = create_submit_args(arguments);
        res[0] = id;
        return res;
    }

    onOptionsAvailable(() => {
        document.body.dataset.xOpts = String(opts.live_preview_refresh_period);
    });
''')


def write_tab_extension(root):
    ext = write_extension(root, EXTENSION_SCRIPT + EXTENSION_TAB)
    (ext / "javascript" / "x_tab.js").write_text(EXTENSION_TAB_JS)
    return ext


def tab_module(harness):
    """The extension's tab script module (the host imports it under no importable name)."""
    import inspect

    start = component(harness.blocks, "x_start")
    (_, fn), = handlers(harness.blocks, start)
    return inspect.unwrap(fn).__globals__


def test_ui_config_applies_saved_values_like_the_host(tmp_path, tiny_checkpoint):
    """Keys `<tab id>/<label>/<field>` (a script control's under `customscript/<file>/`), values applied
    with the host's conditions, new keys written back, `do_not_save_to_config` left alone."""
    import json

    from host_harness import HostHarness

    ext = write_tab_extension(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    stale = {
        "txt2img/Width/value": 768, "txt2img/Width/maximum": 4096, "txt2img/Height/step": 16,
        "txt2img/Script/value": "Y script",
        "customscript/x_script.py/txt2img/X word/value": 12,
        "x_tab/X word/value": "dogs",
        "x_tab/X pick/value": "zz",  # not among the choices: left in the file, not applied
        "x_tab/X count/value": "many",  # not a number: not applied
        "x_tab/X secret/value": "stale",  # do_not_save_to_config: never read
        "x_tab/X mode/value": "medium",  # not among the radio's choices
        "x_tab/X strength/value": 0.8, "x_tab/X strength/visible": False,
        "webui/Tabs@tabs/selected": "x_tab",
    }
    (data / "ui-config.json").write_text(json.dumps(stale))
    harness = HostHarness(data, tiny_checkpoint, extensions=[str(ext)])
    try:
        blocks = harness.blocks
        value = lambda elem_id: component(blocks, elem_id).value  # noqa: E731
        width, height = component(blocks, "txt2img_width"), component(blocks, "txt2img_height")
        assert (width.value, width.maximum, height.step, height.value) == (768, 4096, 16, 512)
        assert harness.scripts.inputs[0].value == "Y script"
        x, y = harness.scripts.selectable_scripts
        assert y.group.visible and not x.group.visible  # the dropdown's init_field
        assert x.controls[0].value == "12"  # a Textbox gets str(value)
        assert scripts_img2img_word(harness) == ""  # img2img's own key is absent
        assert (value("x_word"), value("x_pick"), value("x_count"), value("x_secret"), value("x_mode")) == \
            ("dogs", "b", 3, "fresh", "slow")
        strength = component(blocks, "x_strength")
        assert strength.value == 0.8 and strength.visible is False
        assert component(blocks, "tabs").selected == "x_tab"

        saved = json.loads((data / "ui-config.json").read_text())
        assert {k: saved[k] for k in stale} == stale  # nothing the file held is rewritten
        assert saved["txt2img/Height/value"] == 512 and saved["x_tab/Start/visible"] is True
        assert saved["customscript/x_script.py/img2img/X word/value"] == ""
        assert saved["customscript/x_script.py/txt2img/Y steps/maximum"] == 9
        assert saved["pnginfo/Send to txt2img/visible"] is True
        assert saved["txt2img/Tabs@txt2img_extra_tabs/selected"] is None
        assert not [k for k in saved if k.startswith(("X tab/", "txt2img/X word", "txt2img/Y steps"))]
        assert blocks.ui_loadsave.component_mapping["x_tab/X word/value"] is component(blocks, "x_word")
    finally:
        harness.close()


def scripts_img2img_word(harness):
    from modules import scripts

    return scripts.scripts_img2img.selectable_scripts[0].controls[0].value


def test_ui_config_is_written_only_when_it_changes(tmp_path, tiny_checkpoint):
    import json

    from host_harness import HostHarness

    from modules import errors

    ext = write_tab_extension(tmp_path)
    config = tmp_path / "elsewhere" / "ui.json"
    config.parent.mkdir()
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)], ui_config_file=config)
    harness.close()
    assert not (tmp_path / "data" / "ui-config.json").exists()
    first = json.loads(config.read_text())
    assert first["x_tab/X pick/value"] == "b"  # the callable's value when the UI was built
    assert "x_tab/X secret/value" not in first and "x_tab/X secret/visible" not in first

    config.write_text(json.dumps(first))  # the same settings, not the host's indented layout
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)], ui_config_file=config)
    harness.close()
    assert config.read_text() == json.dumps(first)  # unchanged: not written

    del first["x_tab/X count/value"]
    config.write_text(json.dumps(first))
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)], ui_config_file=config)
    harness.close()
    assert json.loads(config.read_text())["x_tab/X count/value"] == 3
    assert config.read_text().startswith('{\n    "')  # json.dump(indent=4) of the whole file

    config.write_text("{not json")
    errors.reported.clear()
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)], ui_config_file=config)
    harness.close()
    assert config.read_text() == "{not json"  # unreadable: never overwritten
    assert any(r.startswith("loading settings") for r in errors.reported)


def test_progress_bar_and_callable_value_in_a_browser(tmp_path, tiny_checkpoint, browser_page):
    """Chromium, an extension tab doing what the host's Checkpoint Merger does: the host's progress
    bar over its panel while the job runs, the task id first in the job's arguments, the bar gone and
    `atEnd` called when it completes; a Dropdown whose value is a function shows the function's
    result at every page load, over a saved ui-config value; Esc in a tab without an Interrupt
    button throws, as in the host."""
    import json
    import re

    from host_harness import HostHarness

    ext = write_tab_extension(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "ui-config.json").write_text(json.dumps({"x_tab/X pick/value": "a"}))
    harness = HostHarness(data, tiny_checkpoint, extensions=[str(ext)])
    module = tab_module(harness)
    try:
        url = harness.serve()
        ask = urllib.request.Request(url + "internal/progress", data=b'{"id_task": "task(nobody)"}',
                                     headers={"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(ask, timeout=10).read()) == {
            "active": False, "queued": False, "completed": False, "progress": None, "eta": None,
            "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting..."}
        pending = json.loads(urllib.request.urlopen(url + "internal/pending-tasks", timeout=10).read())
        assert pending == {"size": 0, "tasks": []}

        page = browser_page.page
        page.set_default_timeout(30_000)
        module["PICK"][0] = "c"
        page.goto(url)
        page.wait_for_function("Object.keys(opts).length > 0")  # settings_json read
        page.click("#tabs > .tab-nav > button:has-text('X tab')")
        page.wait_for_function("gradioApp().querySelector('#x_pick input').value === 'c'")
        assert page.evaluate("opts.show_progressbar") is True
        assert page.evaluate("getComputedStyle(gradioApp().querySelector('#txt2img_interrupt')).display") == "none"
        assert page.evaluate("create_submit_args([1, [2], 3, 4])") == [1, None, 3, 4]
        assert re.fullmatch(r"task\([0-9a-z]{1,15}\)", page.evaluate("randomId()"))

        page.click("#x_start")
        assert module["REACHED"].wait(30)
        bar = page.wait_for_selector("#x_panel ~ .progressDiv, .progressDiv:has(+ #x_panel)", state="visible")
        page.wait_for_function("""() => {
            const inner = gradioApp().querySelector('.progressDiv > .progress');
            return inner && inner.textContent.startsWith('Fusing cats 50%');
        }""")
        assert re.fullmatch(r"Fusing cats 50%( ETA: \d+s)?", page.evaluate(
            "gradioApp().querySelector('.progressDiv > .progress').textContent"))
        assert page.evaluate("gradioApp().querySelector('.progressDiv > .progress').style.width") == "50%"
        assert page.evaluate("document.getElementById('x_panel').previousElementSibling.className") == "progressDiv"
        assert page.title().startswith("[50%")
        assert bar.is_visible()
        module["GATE"].set()
        page.wait_for_function("document.body.dataset.xEnded !== undefined")
        task = page.evaluate("document.body.dataset.xEnded")
        page.wait_for_selector("#x_done")
        assert page.inner_text("#x_done") == f"{task} cats"
        assert page.query_selector(".progressDiv") is None and page.title() == "Stable Diffusion"
        from modules import progress
        assert task in progress.finished_tasks and progress.current_task is None

        module["PICK"][0] = "b"  # not the saved "a" the page is built with: only the load event shows it
        page.reload()
        page.click("#tabs > .tab-nav > button:has-text('X tab')")
        page.wait_for_function("gradioApp().querySelector('#x_pick input').value === 'b'")
        page.wait_for_function("document.body.dataset.xOpts === '1000'")  # onOptionsAvailable ran

        assert browser_page.errors == []
        page.keyboard.press("Escape")  # the X tab has no Interrupt button: the host's handler throws
        page.wait_for_timeout(300)
        assert [e for e in browser_page.errors if "reading 'style'" in e]
        browser_page.errors.clear()
        page.click("#tabs > .tab-nav > button:has-text('txt2img')")
        page.wait_for_function("get_uiCurrentTab().textContent.trim() === 'txt2img'")
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        assert browser_page.errors == []
        harness.wait_idle()
    finally:
        module["GATE"].set()
        harness.close()
