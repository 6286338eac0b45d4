"""The WebUI page (modules/ui.py and modules/ui_toprow.py): the DOM contracts extensions' javascript
relies on, with real gradio 3.41.2 components.

`create_ui()` builds each tab as a Blocks of its own and renders them inside `gr.Tabs(elem_id="tabs")`
as `gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}")`, as the host does: txt2img, img2img (its prompt
row and its scripts' UI only), PNG Info, then the `on_ui_tabs` tabs of extensions.

txt2img keeps the host's element ids and nesting: `txt2img_toprow` with `txt2img_prompt`,
`txt2img_neg_prompt` and `txt2img_generate`; the `txt2img_extra_tabs` tabs with the Generation tab;
`txt2img_settings` holding the width and height sliders and the `txt2img_script_container` group with
the scripts' UI (`ScriptRunner.setup_ui`); `txt2img_results` beside it. Its paste fields (prompt,
negative prompt, Size-1, Size-2 and the scripts' `infotext_fields`) receive an infotext from the toprow
paste button and from PNG Info's "Send to txt2img". As in the host, Generate (and Shift+Enter in the
prompt) submits the prompts, the size and every script control, which is also what makes gradio render
those controls editable; it generates with the double's txt2img (Euler, 20 steps, the host's defaults
otherwise) into the `txt2img_gallery`, `generation_info_txt2img`, `html_info_txt2img` and
`html_log_txt2img` outputs.

As in the host, each tab's components take their saved defaults from ui-config.json once the tab is
rendered (`ui_loadsave.UiLoadsave.add_block(interface, ifid)`), new defaults are written back, and a
hidden `settings_json` textbox carries the settings to the page's `opts`. The generate box has the
host's Interrupt, Skip and Interrupting buttons before Generate.
"""

from __future__ import annotations

txt2img_paste_fields: list = []
img2img_paste_fields: list = []
extension_tabs: list = []
"""The `(blocks, title, elem_id)` tabs `on_ui_tabs` callbacks gave the last `create_ui()`."""

paste_symbol = "\u2199\ufe0f"  # ↙️


def reload_gradio_theme():
    """The host's default theme: gradio's Default with font stacks of system fonts only, so the page
    never asks for web fonts."""
    import gradio as gr

    from modules import shared

    shared.gradio_theme = gr.themes.Default(
        font=["Source Sans Pro", "ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["IBM Plex Mono", "ui-monospace", "Consolas", "monospace"],
    )
    return shared.gradio_theme


class Toprow:
    """The prompt row of txt2img/img2img (ui_toprow.Toprow, classic layout): prompts, the generate
    box and the tools row with the paste button."""

    def __init__(self, is_img2img: bool, id_part: str | None = None) -> None:
        import gradio as gr

        from modules import shared

        self.id_part = id_part or ("img2img" if is_img2img else "txt2img")
        self.is_img2img = is_img2img
        part = self.id_part
        with gr.Row(elem_id=f"{part}_toprow", variant="compact"):
            with gr.Column(elem_id=f"{part}_prompt_container", scale=6):
                with gr.Row(elem_id=f"{part}_prompt_row", elem_classes=["prompt-row"]):
                    self.prompt = gr.Textbox(label="Prompt", elem_id=f"{part}_prompt", show_label=False, lines=3,
                                             placeholder="Prompt", elem_classes=["prompt"])
                with gr.Row(elem_id=f"{part}_neg_prompt_row", elem_classes=["prompt-row"]):
                    self.negative_prompt = gr.Textbox(label="Negative prompt", elem_id=f"{part}_neg_prompt",
                                                      show_label=False, lines=3, placeholder="Negative prompt",
                                                      elem_classes=["prompt"])
            with gr.Column(scale=1, elem_id=f"{part}_actions_column"):
                with gr.Row(elem_id=f"{part}_generate_box", elem_classes=["generate-box"]):
                    # hidden by the host's css until a job runs; Esc and Alt+Enter (script.js) use them
                    self.interrupt = gr.Button("Interrupt", elem_id=f"{part}_interrupt",
                                               elem_classes="generate-box-interrupt")
                    self.skip = gr.Button("Skip", elem_id=f"{part}_skip", elem_classes="generate-box-skip")
                    self.interrupting = gr.Button("Interrupting...", elem_id=f"{part}_interrupting",
                                                  elem_classes="generate-box-interrupting")
                    self.submit = gr.Button("Generate", elem_id=f"{part}_generate", variant="primary")

                    def interrupt_function():
                        state = shared.state
                        if not state.stopping_generation and state.job_count > 1 and shared.opts.interrupt_after_current:
                            state.stop_generating()
                            gr.Info("Generation will stop after finishing this image, click again to stop immediately.")
                        else:
                            state.interrupt()

                    self.skip.click(fn=shared.state.skip)
                    self.interrupt.click(fn=interrupt_function,
                                         _js=f'function(){{ showSubmitInterruptingPlaceholder("{part}"); }}')
                    self.interrupting.click(fn=interrupt_function)
                with gr.Row(elem_id=f"{part}_tools"):
                    self.paste = gr.Button(value=paste_symbol, elem_id="paste", elem_classes=["tool"])


def plaintext_to_html(text: str, classname: str | None = None) -> str:
    import html

    lines = "<br>\n".join(html.escape(line) for line in text.split("\n"))
    return f"<p class='{classname}'>{lines}</p>" if classname else f"<p>{lines}</p>"


def txt2img_from_page(prompt: str, negative_prompt: str, height: float, width: float, *script_args):
    """What the Generate button runs: the double's txt2img with the page's values."""
    from modules import txt2img

    processed = txt2img.txt2img(prompt, negative_prompt, width=int(width), height=int(height), steps=20,
                                sampler_name="Euler", script_args=list(script_args))
    return (processed.images, processed.js(), plaintext_to_html(processed.info),
            plaintext_to_html(processed.comments, classname="comments"))


def create_output_panel(tabname: str):
    """Gallery, generation info and logs of a tab (ui_common.create_output_panel, without its
    image buttons)."""
    import gradio as gr

    with gr.Column(elem_id=f"{tabname}_results"), gr.Column(variant="panel", elem_id=f"{tabname}_results_panel"):
        with gr.Group(elem_id=f"{tabname}_gallery_container"):
            gallery = gr.Gallery(label="Output", show_label=False, elem_id=f"{tabname}_gallery", columns=4,
                                 preview=True)
        with gr.Group():
            infotext = gr.HTML(elem_id=f"html_info_{tabname}", elem_classes="infotext")
            html_log = gr.HTML(elem_id=f"html_log_{tabname}", elem_classes="html-log")
            generation_info = gr.Textbox(visible=False, elem_id=f"generation_info_{tabname}")
    return gallery, generation_info, infotext, html_log


def create_txt2img_interface():
    import gradio as gr

    from modules import call_queue, infotext_utils, scripts

    with gr.Blocks(analytics_enabled=False) as interface:
        toprow = Toprow(is_img2img=False)
        with gr.Tabs(elem_id="txt2img_extra_tabs", elem_classes=["extra-networks"]), \
                gr.Tab("Generation", id="txt2img_generation"), \
                gr.Row(equal_height=False, elem_classes=["resize-handle-row"]):
            with gr.Column(variant="compact", elem_id="txt2img_settings"):
                scripts.scripts_txt2img.prepare_ui()
                with gr.Row(), gr.Column(elem_id="txt2img_column_size", scale=4):
                    width = gr.Slider(minimum=64, maximum=2048, step=8, label="Width", value=512,
                                      elem_id="txt2img_width")
                    height = gr.Slider(minimum=64, maximum=2048, step=8, label="Height", value=512,
                                       elem_id="txt2img_height")
                with gr.Group(elem_id="txt2img_script_container"):
                    custom_inputs = scripts.scripts_txt2img.setup_ui()
            outputs = create_output_panel("txt2img")

        generate = {
            "fn": call_queue.wrap_gradio_gpu_call(txt2img_from_page, extra_outputs=[None, "", ""]),
            "inputs": [toprow.prompt, toprow.negative_prompt, height, width, *custom_inputs],
            "outputs": list(outputs),
            "show_progress": False,
        }
        toprow.prompt.submit(**generate)
        toprow.submit.click(**generate)

        fields = [
            infotext_utils.PasteField(toprow.prompt, "Prompt", api="prompt"),
            infotext_utils.PasteField(toprow.negative_prompt, "Negative prompt", api="negative_prompt"),
            infotext_utils.PasteField(width, "Size-1", api="width"),
            infotext_utils.PasteField(height, "Size-2", api="height"),
            *scripts.scripts_txt2img.infotext_fields,
        ]
        infotext_utils.add_paste_fields("txt2img", None, fields, None)
        infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
            paste_button=toprow.paste, tabname="txt2img", source_text_component=toprow.prompt,
            source_image_component=None))
    return interface


def create_img2img_interface():
    """The prompt row and the img2img scripts' UI (`img2img_script_container`), which decides the
    img2img script_args layout; nothing submits them (img2img runs through `modules.img2img.img2img`)."""
    import gradio as gr

    from modules import scripts

    with gr.Blocks(analytics_enabled=False) as interface:
        Toprow(is_img2img=True)
        with gr.Column(variant="compact", elem_id="img2img_settings"):
            scripts.scripts_img2img.prepare_ui()
            with gr.Group(elem_id="img2img_script_container"):
                scripts.scripts_img2img.setup_ui()
    return interface


def run_pnginfo(image):
    """The infotext a PNG carries in its `parameters` text chunk, and every text chunk as HTML."""
    import html

    if image is None:
        return "", "", ""
    items = {k: v for k, v in (getattr(image, "info", None) or {}).items() if isinstance(v, str)}
    geninfo = items.pop("parameters", None)
    items = {"parameters": geninfo, **items}
    info = "".join(f"<div><p>{html.escape(str(k))}</p><p>{html.escape(str(v))}</p></div>\n"
                   for k, v in items.items() if v is not None)
    return "", geninfo, info or "<div><p>The image carries no text.</p></div>"


def create_pnginfo_interface():
    import gradio as gr

    from modules import infotext_utils

    with gr.Blocks(analytics_enabled=False) as interface:
        with gr.Row(equal_height=False, elem_classes=["resize-handle-row"]):
            with gr.Column(variant="panel"):
                image = gr.Image(elem_id="pnginfo_image", label="Source", source="upload", interactive=True,
                                 type="pil")
            with gr.Column(variant="panel"):
                html = gr.HTML()
                generation_info = gr.Textbox(visible=False, elem_id="pnginfo_generation_info")
                html2 = gr.HTML()
                with gr.Row():
                    buttons = infotext_utils.create_buttons(["txt2img"])
                for tabname, button in buttons.items():
                    infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
                        paste_button=button, tabname=tabname, source_text_component=generation_info,
                        source_image_component=image))
        image.change(fn=run_pnginfo, inputs=[image], outputs=[html, generation_info, html2])
    return interface


def create_ui():
    """The whole page; `scripts.scripts_txt2img` must be initialized (`create_script_runners`)."""
    import gradio as gr

    from modules import infotext_utils, script_callbacks, shared, ui_loadsave

    theme = reload_gradio_theme()
    infotext_utils.reset()
    loadsave = ui_loadsave.UiLoadsave(shared.cmd_opts.ui_config_file)
    ui_settings_from_file = loadsave.ui_settings.copy()

    interfaces = [
        (create_txt2img_interface(), "txt2img", "txt2img"),
        (create_img2img_interface(), "img2img", "img2img"),
        (create_pnginfo_interface(), "PNG Info", "pnginfo"),
    ]
    extension_tabs[:] = script_callbacks.ui_tabs_callback()
    interfaces += extension_tabs
    shared.tab_names = [label for _, label, _ in interfaces]

    with gr.Blocks(theme=theme, analytics_enabled=False, title="Stable Diffusion") as demo:
        infotext_utils.connect_paste_params_buttons()
        with gr.Tabs(elem_id="tabs") as tabs:
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
                loadsave.add_block(interface, ifid)
            loadsave.add_component(f"webui/Tabs@{tabs.elem_id}", tabs)
            loadsave.finalized_ui = True  # the host's setup_ui, without its Settings > Defaults page
        # the host's Settings page keeps every setting here for the page's `opts`, read again at each
        # page load (a callable value)
        gr.Textbox(elem_id="settings_json", value=lambda: shared.opts.dumpjson(), visible=False)

    if ui_settings_from_file != loadsave.ui_settings:
        loadsave.dump_defaults()
    demo.ui_loadsave = loadsave
    return demo
