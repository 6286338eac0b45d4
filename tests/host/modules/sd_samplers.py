"""Samplers (modules/sd_samplers*.py). The double has k-diffusion's Euler over the discrete
SD1 schedule, enough to run real denoising loops; other names are refused."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modules import sd_samplers_common, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser
from modules.shared import state


@dataclass
class SamplerConfig:
    name: str
    aliases: tuple[str, ...] = ()

    def total_steps(self, steps: int) -> int:
        return steps


all_samplers = [SamplerConfig("Euler", ("k_euler",))]
samplers = all_samplers


def find_sampler_config(name):
    for config in all_samplers:
        if name == config.name or name in config.aliases:
            return config
    return None


def fix_p_invalid_sampler_and_scheduler(p) -> None:
    if p.sampler_name is None:
        p.sampler_name = "Euler"


class CompVisDenoiser(torch.nn.Module):
    """eps-prediction model as a denoiser in sigma space (k-diffusion's CompVisDenoiser)."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        ac = model.alphas_cumprod.to(torch.float32)
        self.register_buffer("sigmas", ((1 - ac) / ac) ** 0.5)
        self.register_buffer("log_sigmas", self.sigmas.log())

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def t_to_sigma(self, t):
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int):
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self.t_to_sigma(t), t.new_zeros([1])])

    def forward(self, x, sigma, **kwargs):
        s = sigma[:, None, None, None]
        c_in = 1 / (s ** 2 + 1) ** 0.5
        eps = self.inner_model.apply_model(x * c_in, self.sigma_to_t(sigma), **kwargs)
        return x - eps * s


class KDiffusionSampler:
    def __init__(self, name: str, sd_model):
        self.config = find_sampler_config(name)
        self.model_wrap = CompVisDenoiser(sd_model)
        self.conditioning_key = sd_model.model.conditioning_key
        self.model_wrap_cfg = CFGDenoiser(self)
        self.last_latent = None
        self.sampler_extra_args: dict = {}
        self.p = None

    def initialize(self, p) -> None:
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0) or 0.0

    def launch_sampling(self, steps: int, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except sd_samplers_common.InterruptedException:
            return self.last_latent

    def _euler(self, x, sigmas):
        for i in range(len(sigmas) - 1):
            denoised = self.model_wrap_cfg(x, sigmas[i] * x.new_ones([x.shape[0]]), **self.sampler_extra_args)
            state.sampling_step = i  # the host's step callback runs after the model call
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x

    def _extra_args(self, p, c, uc, image_conditioning):
        return {"cond": c, "image_cond": image_conditioning, "uncond": uc, "cond_scale": p.cfg_scale,
                "s_min_uncond": self.s_min_uncond}

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.model_wrap.get_sigmas(steps)
        x = x * sigmas[0]
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: self._euler(x, sigmas))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.model_wrap.get_sigmas(steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        if shared.opts.img2img_extra_noise > 0:
            raise NotImplementedError("the test double has no img2img extra noise (extra_noise callbacks)")
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: self._euler(xi, sigma_sched))


def create_sampler(name, model):
    if find_sampler_config(name) is None:
        raise ValueError(f"bad sampler name: {name}")
    sampler = KDiffusionSampler(name, model)
    sampler.model_wrap_cfg.p = None
    return sampler


def sample_to_image(samples, index=0, approximation=None):
    from modules import processing

    return processing.latent_to_pil(shared.sd_model, samples[index:index + 1])[0]
