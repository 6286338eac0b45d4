"""The txt2img entry point (modules/txt2img.py): build the processing object, let the selected
dropdown script run, else run `process_images` plainly, all inside `with closing(p)`; and the API's
path (modules/api/api.py) for the same fields."""

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
    """The UI's txt2img, or with `is_api` what the API's /sdapi/v1/txt2img does with the same fields."""
    if is_api:
        return run_api(processing.StableDiffusionProcessingTxt2Img, scripts.scripts_txt2img, "scripts_txt2img",
                       script_args, prompt=prompt, negative_prompt=negative_prompt, **fields)
    p = txt2img_create_processing(prompt, negative_prompt, script_args=script_args, **fields)
    with closing(p):
        processed = scripts.scripts_txt2img.run(p, *p.script_args)
        if processed is None:
            processed = processing.process_images(p)
    shared.total_tqdm.clear()
    return processed


def run_api(processing_class, script_runner, job: str, script_args, **fields):
    """What modules/api/api.py (text2imgapi / img2imgapi) does around a processing object: `is_api` set
    before the scripts and their args (so `setup` sees is_ui=False), job state begun and ended, and
    `p.close()` always. `script_args[0]` is the dropdown index: a chosen script runs and its result is
    returned as is (the API does not fall back to process_images); otherwise process_images runs."""
    script_args = list(script_args)
    with closing(processing_class(sd_model=shared.sd_model, **fields)) as p:
        p.is_api = True
        p.scripts = script_runner
        try:
            shared.state.begin(job=job)
            if script_args and script_args[0]:
                p.script_args = script_args
                processed = script_runner.run(p, *p.script_args)
            else:
                p.script_args = tuple(script_args)
                processed = processing.process_images(p)
        finally:
            shared.state.end()
            shared.total_tqdm.clear()
    return processed
