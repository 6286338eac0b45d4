"""A seeded Euler sampler with classifier-free guidance for eps-prediction UNets (SD1, SDXL).

Used where the host is not: the demo, the fusion CLI's spatial stage, tests. It follows the
k-diffusion "Euler" sampler the host runs by default on the discrete SD1 schedule, so results are
comparable, and it is deterministic: noise comes from one torch.Generator per image seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lib_mos.models.attention import Attn2Processor, LayerwiseContext, attn2_processor
from lib_mos.models.sd1 import SD1Model

LATENT_CHANNELS = 4
LATENT_FACTOR = 8
# SD1 latent -> RGB linear map (the host's "Approx cheap" live preview); the tiny model has no VAE.
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])


def discrete_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` sigmas evenly spaced in timestep from 999 to 0 (interpolated in log sigma), then 0."""
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, steps, dtype=torch.float64)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    sigmas = ((1 - w) * log_sigmas[low].double() + w * log_sigmas[high].double()).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of `sigma` on the discrete schedule (inverse of the interpolation above)."""
    ls = sigma.log()
    low = (ls[None] >= log_sigmas[:, None]).sum(0).sub(1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - ls) / (lo - hi)).clamp(0, 1)
    return low + w


@contextlib.contextmanager
def any_multiple_of_8() -> Iterator[None]:
    """ldm's UNet needs sizes divisible by 64 because skip connections are concatenated as is; the
    host patches that cat to resize (sd_hijack_unet). Do the same for the duration of a call."""
    import ldm.modules.diffusionmodules.openaimodel as openaimodel

    class _Torch:
        def __getattr__(self, item: str):
            return getattr(torch, item)

        @staticmethod
        def cat(tensors, *args, **kwargs):
            if len(tensors) == 2 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
                tensors = (torch.nn.functional.interpolate(tensors[0], tensors[1].shape[-2:], mode="nearest"),
                           tensors[1])
            return torch.cat(tensors, *args, **kwargs)

    saved = openaimodel.th
    openaimodel.th = _Torch() if saved is torch else saved
    try:
        yield
    finally:
        openaimodel.th = saved


def initial_noise(seeds: list[int], height: int, width: int) -> torch.Tensor:
    """One N(0, 1) latent per seed, independent of batch composition."""
    if height % LATENT_FACTOR or width % LATENT_FACTOR:
        raise ValueError(f"width and height must be multiples of {LATENT_FACTOR}, got {width}x{height}")
    shape = (LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


StepCallback = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class Pass:
    """One of several UNet passes whose predictions are blended (`lib_mos.regional.passes`): its
    attn2 processor, the hooks it needs for its call (e.g. its region LoRAs' `installed`), and its
    share of the prediction, [h, w] at the latent's resolution."""

    processor: Attn2Processor | None
    hooks: Callable[[], contextlib.AbstractContextManager] | None
    share: torch.Tensor


Conditioning = torch.Tensor | Mapping[str, torch.Tensor]


def conditioning_to(cond: Conditioning, device: torch.device | str) -> Conditioning:
    """A tensor or {crossattn, vector} conditioning on `device`."""
    if isinstance(cond, Mapping):
        return {k: v.to(device) for k, v in cond.items()}
    return cond.to(device)


def unpack_conditioning(cond: Conditioning, uncond: Conditioning | None, cfg_scale: float,
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(cond context, uncond context, the batch's vector or None) for `Denoiser`: with a vector
    (SDXL) the cond rows' vectors come first, then the uncond ones' when guidance runs."""
    if not isinstance(cond, Mapping):
        if isinstance(uncond, Mapping):
            raise ValueError("uncond is a {crossattn, vector} mapping, cond must be one too")
        return cond, uncond, None
    if not isinstance(uncond, Mapping | None):
        raise ValueError("cond is a {crossattn, vector} mapping, uncond must be one too")
    guided = uncond is not None and cfg_scale != 1.0
    vector = torch.cat([cond["vector"], uncond["vector"]]) if guided else cond["vector"]
    return cond["crossattn"], None if uncond is None else uncond["crossattn"], vector


@torch.no_grad()
def sample_euler(
    model: SD1Model,
    cond: torch.Tensor | Mapping[str, torch.Tensor],
    uncond: torch.Tensor | Mapping[str, torch.Tensor] | None,
    *,
    seeds: list[int],
    height: int,
    width: int,
    steps: int = 20,
    cfg_scale: float = 7.5,
    callback: StepCallback | None = None,
    processor: Attn2Processor | None = None,
    passes: Sequence[Pass] = (),
) -> torch.Tensor:
    """Latents [B, 4, H/8, W/8]. `cond`/`uncond` are [B, T, D], or layer-wise [B, L, T, D] (bound
    concept prompts; see `binding`); for a UNet with a vector input (SDXL) a mapping
    {"crossattn": that tensor, "vector": [B, V]}. uncond None or cfg 1: no guidance.

    cond and uncond go through the UNet as one batch (cond rows first), like the host's default.
    `processor` replaces the attn2 behaviour (e.g. `RegionalContext` with rows set for that batch).
    `passes` (instead of `processor`): every step runs each pass and blends their predictions.
    """
    if passes and processor is not None:
        raise ValueError("give either one attn2 processor or passes, each with its own")
    cond, uncond, vector = unpack_conditioning(cond, uncond, cfg_scale)
    if cond.shape[0] != len(seeds):
        raise ValueError(f"{cond.shape[0]} conditionings for {len(seeds)} seeds")
    device = cond.device
    sigmas = discrete_sigmas(model.alphas_cumprod, steps).to(device)
    x = initial_noise(seeds, height, width).to(device) * sigmas[0]
    guided = uncond is not None and cfg_scale != 1.0
    step = Denoiser(model, cond, uncond if guided else None, cfg_scale, vector)
    with any_multiple_of_8(), contextlib.nullcontext() if passes else step.attention(processor):
        for i in range(steps):
            sigma = sigmas[i]
            eps = step.blended(x, sigma, passes) if passes else step(x, sigma)
            if callback is not None:
                callback(i, x)
            # Euler step in sigma space: x0 = x - sigma * eps, d = (x - x0) / sigma = eps
            x = x + eps * (sigmas[i + 1] - sigma)
    return x


class Denoiser:
    """The sampler's (guided) noise prediction at latents x [B, 4, h, w] and noise level sigma (a
    0-d tensor): cond and uncond rows as one batch, cond first, like the host's default; uncond
    None: no guidance. A side given per layer [B, L, T, D] makes the other one layer-wise too.
    Call it inside `any_multiple_of_8()` and `attention(processor)`."""

    def __init__(self, model: SD1Model, cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float,
                 vector: torch.Tensor | None = None) -> None:
        if uncond is not None and uncond.dim() != cond.dim():
            layers = (cond if cond.dim() == 4 else uncond).shape[1]
            cond, uncond = (c if c.dim() == 4 else c.unsqueeze(1).expand(-1, layers, -1, -1) for c in (cond, uncond))
        self.model, self.cfg_scale, self.guided = model, cfg_scale, uncond is not None
        # a half-precision UNet (SDXL in a fusion) runs under autocast: ldm feeds its time
        # embedding in float32, and the latents stay float32 between steps
        self.dtype = next(model.unet.parameters()).dtype
        self.context = torch.cat([cond, uncond]) if uncond is not None else cond
        self.extra = {} if vector is None else {"y": vector.to(cond.device)}
        ac = model.alphas_cumprod.to(cond.device)
        self.log_sigmas = (((1 - ac) / ac) ** 0.5).log()

    def attention(self, processor: Attn2Processor | None) -> contextlib.AbstractContextManager:
        """The attn2 behaviour for the calls: `processor`, else layer-wise context where given."""
        if processor is not None:
            return attn2_processor(self.model.unet, processor)
        if self.context.dim() == 4:
            return attn2_processor(self.model.unet, LayerwiseContext())
        return contextlib.nullcontext()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_in = 1 / (sigma**2 + 1) ** 0.5
        x_in = torch.cat([x, x]) if self.guided else x
        t = sigma_to_t(sigma.reshape(1), self.log_sigmas).expand(x_in.shape[0])
        half = contextlib.nullcontext() if self.dtype == torch.float32 else torch.autocast(x.device.type, self.dtype)
        with half:
            eps = self.model.unet(x_in * c_in, t, context=self.context, **self.extra).float()
        if not self.guided:
            return eps
        eps_c, eps_u = eps.chunk(2)
        return eps_u + self.cfg_scale * (eps_c - eps_u)

    def blended(self, x: torch.Tensor, sigma: torch.Tensor, passes: Sequence[Pass]) -> torch.Tensor:
        """The passes' predictions, each weighted by its share (guidance is linear, so blending the
        guided predictions equals guiding the blended cond and uncond ones)."""
        out = None
        for p in passes:
            with self.attention(p.processor), p.hooks() if p.hooks is not None else contextlib.nullcontext():
                eps = self(x, sigma) * p.share.to(x.device, x.dtype)
            out = eps if out is None else out.add_(eps)
        return out


def latents_to_images(latents: torch.Tensor) -> list[Image.Image]:
    """Preview decode (linear latent->RGB, nearest x8): the tiny model has no VAE."""
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), LATENT_RGB)
    rgb = torch.nn.functional.interpolate(rgb, scale_factor=LATENT_FACTOR, mode="nearest")
    rgb = ((rgb + 1) / 2).clamp(0, 1)
    return [Image.fromarray((255 * np.moveaxis(x.numpy(), 0, 2)).round().astype(np.uint8)) for x in rgb]
