"""What a merged model draws, against each concept's own model: the fusion report's verdict.

Layer errors (`report`) say how well each fused layer reproduces each concept's layer outputs; a
picture is drawn by the CFG-guided noise prediction of the whole UNet, where small layer errors
can add up or cancel. Measured on the toy world, the two disagreed: layer errors favoured fusion
where the pictures favoured weight averaging. So the verdict comes from the prediction itself:

    error(m) = ||eps_m - eps_own|| / ||eps_none - eps_own||

over the concept's own sampling trajectory (the base with the concept's LoRA, its prompts, a few
seeds and steps at the host's CFG), for m = the fused model, weight averaging (every LoRA at
1/N) and LoRA stacking (every LoRA at full weight); eps_none is the base with the concept's
tokens bound and no LoRA. 0: the merged model draws the concept as its own model does; 1: as if
its LoRA were not there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from lib_mos.concepts.binding import PromptBinder
from lib_mos.concepts.concept import Concept, Restorer, applied, kept_aside
from lib_mos.models import sampling
from lib_mos.models.sd1 import SD1Model
from lib_mos.models.sdxl import SDXLModel

METHODS = ("fused", "average", "stacked")


def _trajectory(model: SD1Model | SDXLModel, cond: sampling.Conditioning, uncond: sampling.Conditioning, seeds: list[int], size: int,
                steps: int, cfg: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x before step i, sigma_i) of the model's own Euler run."""
    sigmas = sampling.discrete_sigmas(model.alphas_cumprod, steps).to(next(model.unet.parameters()).device)
    states: list[tuple[torch.Tensor, torch.Tensor]] = []
    sampling.sample_euler(model, cond, uncond, seeds=seeds, height=size, width=size, steps=steps, cfg_scale=cfg,
                          callback=lambda i, x: states.append((x.clone(), sigmas[i])))
    return states


def conditionings(model: SD1Model | SDXLModel, inputs: Sequence, result, *, size: int, seeds: int = 2, seed: int = 0,
                  templates: Callable[[Concept], Sequence[str]], fused_text: Callable[[], object],
                  restore: Restorer = kept_aside) -> list[dict[str, tuple[sampling.Conditioning, sampling.Conditioning]]]:
    """Per input (a `pipeline.FusionInput`): {variant: (cond, uncond)} of its check prompts as each
    model's text side encodes them: its own (its text LoRA), none (tokens bound, no LoRA), fused
    (`fused_text()` a context manager with the fused encoders; `result.concepts` are the fused
    model's concepts), averaged and stacked. Made apart from the UNet's predictions so the text
    encoders can be gone while the UNet runs. `restore`: how LoRA'd layers get back (`applied`)."""
    te, unet = model.text_root, model.unet
    device = next(te.parameters()).device
    n = len(inputs)
    text = {
        "own": lambda item: applied([(item.concept, 0.0, item.text_weight)], unet, te, restore),
        "none": lambda item: contextlib.nullcontext(),
        "fused": lambda item: fused_text(),
        "average": lambda item: applied([(i.concept, 0.0, i.text_weight / n) for i in inputs], unet, te, restore),
        "stacked": lambda item: applied([(i.concept, 0.0, i.text_weight) for i in inputs], unet, te, restore),
    }
    out = []
    for k, item in enumerate(inputs):
        prompts = check_prompts(item.concept, templates, seeds)
        row = {}
        for variant, context in text.items():
            concept = result.concepts[k] if variant == "fused" else item.concept
            with context(item):
                row[variant] = _encode(model, concept, prompts, size, device)
        out.append(row)
    return out


def check_prompts(concept: Concept, templates: Callable[[Concept], Sequence[str]], seeds: int) -> list[str]:
    """One prompt per seed, cycling through the concept's templates."""
    texts = list(templates(concept))
    return [texts[j % len(texts)].replace("{}", concept.prompt_words, 1) for j in range(seeds)]


def prediction_errors(model: SD1Model | SDXLModel, inputs: Sequence,
                      conds: Sequence[dict[str, tuple[sampling.Conditioning, sampling.Conditioning]]], *, size: int,
                      steps: int = 8, seeds: int = 2, cfg: float = 7.0, seed: int = 0,
                      fused_unet: Callable[[], object], on_concept: Callable[[int], None] | None = None,
                      restore: Restorer = kept_aside) -> list[dict[str, float]]:
    """Per input: {method: error} for `METHODS` (see the module's docstring), from its
    `conditionings`; only the UNet runs here (`fused_unet()`: a context manager with the fused UNet
    weights in the model); `on_concept(k)` is called before concept k (progress, interruption)."""
    unet, te = model.unet, model.text_root
    n = len(inputs)
    seed_list = [seed + j for j in range(seeds)]
    merged = {
        "fused": fused_unet,
        "average": lambda: applied([(i.concept, i.unet_weight / n, 0.0) for i in inputs], unet, te, restore),
        "stacked": lambda: applied([(i.concept, i.unet_weight, 0.0) for i in inputs], unet, te, restore),
    }
    out = []
    for k, item in enumerate(inputs):
        if on_concept is not None:
            on_concept(k)
        c = conds[k]
        with applied([(item.concept, item.unet_weight, 0.0)], unet, te, restore):
            states = _trajectory(model, *c["own"], seed_list, size, steps, cfg)
            own = _predictions(model, states, c["own"], cfg)
        scale = (_predictions(model, states, c["none"], cfg) - own).norm().clamp_min(1e-12)
        row = {}
        for method, context in merged.items():
            with context():
                row[method] = float((_predictions(model, states, c[method], cfg) - own).norm() / scale)
        out.append(row)
    return out


def _encode(model: SD1Model | SDXLModel, concept: Concept, prompts: list[str], size: int, device: torch.device,
            ) -> tuple[sampling.Conditioning, sampling.Conditioning]:
    binder = PromptBinder(model, [concept])
    return (sampling.conditioning_to(binder.conditioning(prompts, size, size), device),
            sampling.conditioning_to(binder.conditioning([""] * len(prompts), size, size), device))


@torch.no_grad()
def _predictions(model: SD1Model | SDXLModel, states: list[tuple[torch.Tensor, torch.Tensor]],
                 cond_uncond: tuple[sampling.Conditioning, sampling.Conditioning], cfg: float) -> torch.Tensor:
    """[steps, B, 4, h, w] guided predictions of the live UNet at every recorded state."""
    device = next(model.unet.parameters()).device
    cond, uncond = (sampling.conditioning_to(c, device) for c in cond_uncond)
    cond, uncond, vector = sampling.unpack_conditioning(cond, uncond, cfg)
    step = sampling.Denoiser(model, cond, uncond, cfg, vector)
    with sampling.any_multiple_of_8(), step.attention(None):
        return torch.stack([step(x, sigma) for x, sigma in states])


def best_method(errors: dict[str, float]) -> str:
    """The method whose prediction is nearest the concept's own model (ties: fused first)."""
    return min(METHODS, key=lambda m: (errors[m], METHODS.index(m)))
