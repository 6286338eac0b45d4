"""Shared sampler pieces (modules/sd_samplers_common.py)."""


class InterruptedException(BaseException):
    """Raised inside the denoiser on interrupt/skip; the sampler returns its last latent."""


def setup_img2img_steps(p, steps=None):
    steps = steps or p.steps
    t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc
