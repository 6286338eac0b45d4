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

from collections.abc import Callable, Sequence

import torch

from lib_mos.concepts.binding import PromptBinder
from lib_mos.concepts.concept import Concept, applied
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


def prediction_errors(model: SD1Model | SDXLModel, inputs: Sequence, result, *, size: int, steps: int = 8, seeds: int = 2,
                      cfg: float = 7.0, seed: int = 0, templates: Callable[[Concept], Sequence[str]],
                      fused: Callable[[], object], on_concept: Callable[[int], None] | None = None,
                      ) -> list[dict[str, float]]:
    """Per input (a `pipeline.FusionInput`): {method: error} for `METHODS` (see the module's
    docstring). `result.concepts` are the fused model's concepts to bind; `fused()` is a context
    manager with the fused weights in the model; `templates(concept)` the prompts around its words;
    `on_concept(k)` is called before concept k (progress, interruption)."""
    unet, te = model.unet, model.text_root
    device = next(unet.parameters()).device
    n = len(inputs)
    seed_list = [seed + j for j in range(seeds)]
    merged = {
        "average": lambda: applied([(i.concept, i.unet_weight / n, i.text_weight / n) for i in inputs], unet, te),
        "stacked": lambda: applied([(i.concept, i.unet_weight, i.text_weight) for i in inputs], unet, te),
    }
    out = []
    for k, item in enumerate(inputs):
        if on_concept is not None:
            on_concept(k)
        concept = item.concept
        texts = list(templates(concept))
        prompts = [texts[j % len(texts)].replace("{}", concept.prompt_words, 1) for j in range(seeds)]
        with applied([(concept, item.unet_weight, item.text_weight)], unet, te):
            cond, uncond = _encode(model, concept, prompts, size, device)
            states = _trajectory(model, cond, uncond, seed_list, size, steps, cfg)
            own = _predictions(model, states, concept, prompts, size, cfg, device)
        scale = (_predictions(model, states, concept, prompts, size, cfg, device) - own).norm().clamp_min(1e-12)
        row = {}
        with fused():
            row["fused"] = float((_predictions(model, states, result.concepts[k], prompts, size, cfg, device) - own).norm()
                                 / scale)
        for method, context in merged.items():
            with context():
                row[method] = float((_predictions(model, states, concept, prompts, size, cfg, device) - own).norm() / scale)
        out.append(row)
    return out


def _encode(model: SD1Model | SDXLModel, concept: Concept, prompts: list[str], size: int, device: torch.device,
            ) -> tuple[sampling.Conditioning, sampling.Conditioning]:
    binder = PromptBinder(model, [concept])
    return (sampling.conditioning_to(binder.conditioning(prompts, size, size), device),
            sampling.conditioning_to(binder.conditioning([""] * len(prompts), size, size), device))


@torch.no_grad()
def _predictions(model: SD1Model | SDXLModel, states: list[tuple[torch.Tensor, torch.Tensor]], concept: Concept,
                 prompts: list[str], size: int, cfg: float, device: torch.device) -> torch.Tensor:
    """[steps, B, 4, h, w] guided predictions of the live model at every recorded state."""
    cond, uncond, vector = sampling.unpack_conditioning(*_encode(model, concept, prompts, size, device), cfg)
    step = sampling.Denoiser(model, cond, uncond, cfg, vector)
    with sampling.any_multiple_of_8(), step.attention(None):
        return torch.stack([step(x, sigma) for x, sigma in states])


def best_method(errors: dict[str, float]) -> str:
    """The method whose prediction is nearest the concept's own model (ties: fused first)."""
    return min(METHODS, key=lambda m: (errors[m], METHODS.index(m)))
