"""The img2img entry point (modules/img2img.py), plain img2img only (mode 0): the init image fixed
(EXIF rotation, PNG transparency), the denoising strength checked, the processing object built with
the img2img script runner, the selected dropdown script run, else `process_images`, inside
`with closing(p)`. Sketch, inpainting and batch modes are refused. With `is_api`, what the API's
/sdapi/v1/img2img does (`init_images` given directly)."""

from __future__ import annotations

from contextlib import closing

from modules import images, processing, scripts, shared
from modules.txt2img import run_api


def img2img(prompt: str = "", negative_prompt: str = "", *, init_img=None, mode: int = 0, script_args=(),
            is_api: bool = False, selected_scale_tab: int = 0, scale_by: float = 1.0, **fields):
    if is_api:
        if fields.get("init_images") is None:
            raise ValueError("Init image not found")  # the API answers 404
        return run_api(processing.StableDiffusionProcessingImg2Img, scripts.scripts_img2img, "scripts_img2img",
                       script_args, prompt=prompt, negative_prompt=negative_prompt, **fields)
    if mode != 0:
        raise NotImplementedError("the test double has only plain img2img (mode 0)")
    image = images.fix_image(init_img)
    if selected_scale_tab == 1:
        assert image, "Can't scale by because no image is selected"
        fields["width"] = int(image.width * scale_by)
        fields["height"] = int(image.height * scale_by)
    denoising_strength = fields.setdefault("denoising_strength", 0.75)
    assert 0. <= denoising_strength <= 1., "can only work with strength in [0.0, 1.0]"
    p = processing.StableDiffusionProcessingImg2Img(sd_model=shared.sd_model, prompt=prompt,
                                                    negative_prompt=negative_prompt, init_images=[image], mask=None,
                                                    **fields)
    p.scripts = scripts.scripts_img2img
    p.script_args = list(script_args)
    with closing(p):
        processed = scripts.scripts_img2img.run(p, *p.script_args)
        if processed is None:
            processed = processing.process_images(p)
    shared.total_tqdm.clear()
    return processed
