"""The txt2img entry point (modules/txt2img.py): build the processing object, let the selected
dropdown script run, else run `process_images` plainly."""

from __future__ import annotations

from contextlib import closing

from modules import processing, scripts, shared


def txt2img_create_processing(prompt: str = "", negative_prompt: str = "", *, script_args=(), **fields):
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, prompt=prompt,
                                                    negative_prompt=negative_prompt, **fields)
    p.scripts = scripts.scripts_txt2img
    p.script_args = list(script_args)
    return p


def txt2img(prompt: str = "", negative_prompt: str = "", *, script_args=(), is_api: bool = False, **fields):
    p = txt2img_create_processing(prompt, negative_prompt, script_args=script_args, **fields)
    p.is_api = is_api
    with closing(p):
        processed = scripts.scripts_txt2img.run(p, *p.script_args)
        if processed is None:
            processed = processing.process_images(p)
    shared.total_tqdm.clear()
    return processed
