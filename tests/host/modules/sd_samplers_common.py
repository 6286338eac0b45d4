"""Shared sampler pieces (modules/sd_samplers_common.py)."""

from modules.shared import opts


class InterruptedException(BaseException):
    """Raised inside the denoiser on interrupt/skip; the sampler returns its last latent."""


def setup_img2img_steps(p, steps=None):
    """img2img: the schedule of `p.steps` entered at `denoising_strength`; with explicit `steps` (the
    hires pass) or `img2img_fix_steps`, a longer schedule of which exactly that many steps run."""
    if opts.img2img_fix_steps or steps is not None:
        requested_steps = steps or p.steps
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


approximation_indexes = {"Full": 0, "Approx NN": 1, "Approx cheap": 2, "TAESD": 3}


def images_tensor_to_samples(image, approximation=None, model=None):
    """image [0, 1] -> latent. The double has no VAE: its decoder is a fixed linear latent->RGB map
    upscaled x8 (processing.decode_latent_batch), so encoding is that map's least-squares inverse:
    each 8x8 block averaged, then the minimum-norm latent of that colour (pseudo-inverse)."""
    import torch

    from modules.processing import _LATENT_RGB, opt_f

    if approximation is None:
        approximation = approximation_indexes.get(opts.sd_vae_encode_method, 0)
    if approximation == 3:
        raise NotImplementedError("the test double has no TAESD encoder")
    image = image.float() * 2 - 1
    pooled = torch.nn.functional.avg_pool2d(image, opt_f)
    return torch.einsum("brhw,cr->bchw", pooled, torch.linalg.pinv(_LATENT_RGB.T))
