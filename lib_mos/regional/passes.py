"""Region passes: each region with LoRAs denoised in a UNet pass of its own, the predictions blended.

One-pass region LoRAs (`regional.loras`) keep each LoRA's changes inside its region at every layer,
yet the UNet's convolutions, group norms and self-attention carry what they drew across the region's
edge, and the other regions' LoRAs reach into it the same way: in the toy world a LoRA in one of two
regions changes the other about 0.85 as much as its own, and a concept that comes out right alone
comes out right in its region three times out of four.

Here region r's prompt and LoRAs get a pass of their own: the same spec with every other region
left out (the global prompt draws there), its LoRAs inside it as in one pass; as if region r were
the only region. Inside region r the
prediction is that pass's; the rest of the canvas (the regions without LoRAs, the background) comes
from one more pass with the regions that have no LoRA. Blend weights are the regional attention's
(`attention.region_blend_weights`) at the latent's resolution, so they sum to 1 everywhere and soft
or overlapping masks blend as they do in attention. A region's share of the global prompt stays
inside its own pass's attention.

In its own pass a region's LoRAs change the UNet at `unet_weight` of their weight (the spec's
`pass_unet_weight`), while attn2's keys and values, which read only the region's own prompt, and the
text encoder keep the full weight. On the toy world a full-strength UNet change in a pass drew some
concepts pale (placed 44% with two concepts, 34% with three); at a quarter of it the region's
prompt and keys still carry the concept, and 100% and 94% are placed (docs/results.md).

This is the "latent couple" way of composing (MultiDiffusion; Regional Prompter's latent mode) with
the product's regional attention inside each pass. It costs one UNet pass per region with LoRAs,
plus one when anything is left for the rest: K or K + 1 times the one-pass cost.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lib_mos.models.sampling import Pass
from lib_mos.regional.attention import RegionalContext, region_blend_weights
from lib_mos.regional.loras import RegionDeltas, RegionLora

__all__ = ["PassRun", "RegionPass", "only_regions", "plan_passes", "region_passes"]


@dataclass(frozen=True)
class RegionPass:
    """One UNet pass: the regions it draws (their prompts, masks and LoRAs; the others left to the
    global prompt), its LoRAs, and its share [h*w] of the blended prediction at the latent."""

    regions: tuple[int, ...]
    loras: tuple[RegionLora, ...]
    share: torch.Tensor


def only_regions(masks: Mapping[tuple[int, int], torch.Tensor] | Sequence[torch.Tensor], keep: Sequence[int],
                 scale: float = 1.0) -> dict[tuple[int, int], torch.Tensor] | list[torch.Tensor]:
    """The same [K, N] masks (per level or per layer) with every region not in `keep` zeroed and
    those in it times `scale`: a slot stays, so region indices, contexts and cached keys line up
    with the full spec."""
    def one(m: torch.Tensor) -> torch.Tensor:
        select = torch.zeros(m.shape[-2], 1, dtype=m.dtype, device=m.device)
        select[list(keep)] = scale
        return m * select

    if isinstance(masks, Mapping):
        return {size: one(m) for size, m in masks.items()}
    return [one(m) for m in masks]


def plan_passes(latent_masks: torch.Tensor, loras: Sequence[RegionLora]) -> list[RegionPass]:
    """The passes for masks [K, h*w] at the latent's resolution and the generation's region LoRAs:
    one per region with a LoRA of non-zero weight, in region order, then one with every other
    region where any share is left for it (skipped when the LoRA regions tile the canvas)."""
    k = latent_masks.shape[0]
    active = [lora for lora in loras if lora.weight != 0]
    with_lora = sorted({lora.region for lora in active})
    if any(not 0 <= r < k for r in with_lora):
        raise ValueError(f"region LoRAs name regions {with_lora}, the spec has {k}")
    _, weights = region_blend_weights(latent_masks.unsqueeze(0))
    weights = weights[0]  # [K, h*w], coverage-normalised, the global prompt's share left inside each pass
    passes = [RegionPass((r,), tuple(lora for lora in active if lora.region == r), weights[r]) for r in with_lora]
    rest = 1.0 - sum((p.share for p in passes), torch.zeros_like(weights[0]))
    if not passes or bool((rest > 1e-6).any()):
        passes.append(RegionPass(tuple(r for r in range(k) if r not in with_lora), (), rest.clamp(min=0.0)))
    return passes


@dataclass
class PassRun:
    """A planned pass, ready to run: its attn2 processor (region LoRAs' key/value changes wired in),
    its attention masks (the pass's regions only), its LoRAs' hooks and its share [h, w]."""

    processor: RegionalContext
    masks: list[torch.Tensor]
    deltas: RegionDeltas | None
    share: torch.Tensor

    def set_rows(self, region_context: torch.Tensor, context: torch.Tensor | None = None,
                 global_weight: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        """The row plan of the next UNet call(s), as `RegionalContext.set_rows` with every region's
        context; the pass's masks decide which regions it draws."""
        self.processor.set_rows(region_context, self.masks, context, global_weight, rows)

    def sampling_pass(self) -> Pass:
        return Pass(self.processor, self.deltas.installed if self.deltas else None, self.share)


def region_passes(unet: nn.Module, loras: Sequence[RegionLora], levels: Mapping[tuple[int, int], torch.Tensor],
                  layer_masks: Sequence[torch.Tensor], latent_masks: torch.Tensor,
                  vector_regions: Collection[int] = (), unet_weight: float = 1.0) -> list[PassRun]:
    """The passes of one generation: `levels` (h, w) -> [K, h*w] at every UNet level
    (`regions.level_masks`), `layer_masks` [K, N_l] per attn2 layer, `latent_masks` [K, h, w];
    `vector_regions`: regions whose LoRAs change the UNet's vector input (SDXL's pooled prompt),
    whose pass's hooks then take `vector_changes` (`loras.RegionDeltas`); `unet_weight`: the share
    of each LoRA's weight its UNet layers get inside its pass (the spec's `pass_unet_weight`), all
    but attn2's keys and values, which read the region's own prompt at the full weight, as its
    text-encoder change does."""
    k, h, w = latent_masks.shape
    runs = []
    for plan in plan_passes(latent_masks.reshape(k, h * w), loras):
        processor, deltas = RegionalContext(), None
        if plan.loras:
            deltas = RegionDeltas(unet, plan.loras, k, vectors=bool(set(plan.regions) & set(vector_regions)))
            deltas.set_masks(only_regions(levels, plan.regions, unet_weight))  # inside their regions only
            processor.context_delta = deltas.context_delta
        runs.append(PassRun(processor, only_regions(layer_masks, plan.regions), deltas, plan.share.reshape(h, w)))
    return runs
