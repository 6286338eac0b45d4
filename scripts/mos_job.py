"""Host glue: one generation's Mix-of-Show work, step by step.

A `GenerationJob` belongs to one processing object `p` (stored on it as `p.mos_job`, so nothing
global outlives a generation). It binds concept tokens layer-wise in the main prompt, the main
negative and the region prompts, and applies the regions, through one attn2 processor per
cross-attention module. Before every denoising step (`on_cfg_denoiser`) it hands the processor
the contexts for all rows of that step, in the host's row order (every cond row, then every uncond
row): the prompts' texts at this step (prompt editing `[a:b:n]` is scheduled as the host
schedules it), for the first pass or the hires pass, at this step's latent size. Everything is
built once per row layout, size and texts, and every prompt is encoded once per generation.

The processors are installed on the UNet's attn2 *instances* (`installed`), and removed in
`finally`, or by `uninstall` from the always-on script, whose end the host does not guarantee:
`attach` chains the removal into `p.close()`, which the host calls in `finally` for every request.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch

from lib_mos.concepts.binding import PromptBinder
from lib_mos.concepts.concept import ConceptError, check_fits
from lib_mos.concepts.library import lora_files
from lib_mos.files import import_sibling
from lib_mos.models.attention import attn2_processor
from lib_mos.models.family import SD1, ModelFamily, family_of_unet
from lib_mos.regional.attention import SteppedRegionalContext
from lib_mos.regional.loras import (
    RegionDeltas,
    RegionLora,
    choose_region_loras,
    global_lora_names,
    text_loras_of,
)
from lib_mos.regional.passes import PassRun, region_passes
from lib_mos.regional.regions import RegionSpec, attention_sizes, level_masks, region_masks
from modules import prompt_parser, sd_samplers, shared

mos_host = import_sibling(__file__, "mos_host")
mos_host_binding = import_sibling(__file__, "mos_host_binding")
mos_host_text = import_sibling(__file__, "mos_host_text")

REGIONS_KEY = "Mix-of-Show regions"
CONCEPTS_KEY = "Mix-of-Show concepts"
REGION_LORAS_KEY = "Mix-of-Show region LoRAs"


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value or "")]


def generation_texts(p, spec: RegionSpec | None = None) -> list[str]:
    """Every text of `p` that may mention concept tokens: prompts, negatives (hires ones too), regions."""
    texts = _as_list(getattr(p, "all_prompts", None) or p.prompt)
    texts += _as_list(getattr(p, "all_negative_prompts", None) or p.negative_prompt)
    if getattr(p, "enable_hr", False):
        texts += _as_list(getattr(p, "all_hr_prompts", None) or p.hr_prompt)
        texts += _as_list(getattr(p, "all_hr_negative_prompts", None) or p.hr_negative_prompt)
    for region in spec.regions if spec else ():
        texts += [region.prompt, region.negative]
    return texts


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad [..., T, D] to `length` tokens with the host's empty-prompt chunks (as pad_cond_uncond)."""
    if t.shape[-2] == length:
        return t
    empty = mos_host.ROW.empty_prompt(shared.sd_model).to(t.device, t.dtype)  # [77, D]
    chunks = (length - t.shape[-2]) // empty.shape[0]
    pad = empty.repeat(chunks, 1).expand(*t.shape[:-2], -1, -1)
    return torch.cat([t, pad], dim=-2)


def _common_length(*ts: torch.Tensor) -> list[torch.Tensor]:
    t = max(x.shape[-2] for x in ts)
    return [_pad_tokens(x, t) for x in ts]


class GenerationJob:
    """One generation's spec, concepts, encodings (cached) and attn2 processor."""

    def __init__(self, p, spec: RegionSpec | None, *, strict: bool) -> None:
        self.p = p
        self.spec = spec if spec is not None else RegionSpec(())
        self.processor = SteppedRegionalContext()
        texts = generation_texts(p, self.spec)
        self.family = self._model_family(texts, strict)
        found, binder = mos_host_binding.FoundConcepts(), PromptBinder(None, [], self.family or SD1)
        if self.family is not None:
            try:
                found = mos_host_binding.find_concepts(texts, strict=strict)
                binder = PromptBinder(None, found.concepts, self.family)  # for its token rows; the host encodes
            except Exception as e:
                if strict:
                    raise
                # the always-on script runs in the host's `process` hook, whose errors are only logged:
                # the prompt would silently lose its concepts, so fail the first UNet call instead
                self.processor.error = e
        for warning in found.warnings:
            print(warning, file=sys.stderr)
        self.sources = found.infotext()
        self.binder = binder
        # encodings per (set of region LoRAs, negative): prompt -> [L, T, D]
        self.caches: dict[tuple[tuple, bool], dict[str, torch.Tensor]] = {}
        # SDXL: per (set of region LoRAs, negative), prompt -> how binding changes its vector input
        self.bound_vectors: dict[tuple[tuple, bool], dict[str, torch.Tensor]] = {}
        self.masks: dict[tuple[int, int], dict[tuple[int, int], torch.Tensor]] = {}
        self.plans: dict[tuple, tuple] = {}
        self._installed: contextlib.ExitStack | None = None
        self.region_loras: list[RegionLora] = []
        self.pooled_regions: list[int] = []
        self.vector_cache: dict[tuple, tuple[list[int], torch.Tensor]] = {}
        self.lora_notes = ""
        self.unet_deltas: RegionDeltas | None = None
        self.passes: list[PassRun] = []  # this step's region passes (the spec's `passes`), else one pass
        self.step_rows = (0, 0)  # this step's (cond, uncond) rows, for hosts that name each call's rows
        if self.spec.regions:
            self._choose_region_loras(found)

    def _model_family(self, texts: list[str], strict: bool) -> ModelFamily | None:
        """The loaded model's family; None for a model of no family we know, which is an error only
        where this generation asks something of us (raised, or failing the first UNet call)."""
        try:
            return family_of_unet(mos_host.unet_of(shared.sd_model))
        except ValueError as e:
            error = ConceptError(f"Mix-of-Show: this checkpoint is not supported ({e})")
            if strict:
                raise error from None
            if self.spec.regions or mos_host_binding.concept_tokens_mentioned(texts):
                self.processor.error = error
            return None

    def _choose_region_loras(self, found) -> None:
        """Every region's LoRAs, read and checked against the live model before sampling starts
        (errors name the region, the LoRA and the file)."""
        p, folder = self.p, mos_host_binding.concept_folder()
        main = _as_list(p.prompt) + (_as_list(p.hr_prompt) if getattr(p, "enable_hr", False) else [])
        token_files = [{t: found.files[t] for t in self.binder.concept_tokens_in(r.text) if t in found.files}
                       for r in self.spec.regions]
        choices = choose_region_loras(self.spec, lora_files(folder), folder, token_files, global_lora_names(main))
        model = shared.sd_model
        unet = mos_host.unet_of(model)
        self.text_root = text_root = mos_host_text.HostTextRoot(model, self.family)
        loras = []
        for choice in choices:
            concept = mos_host_binding.LIBRARY.lora(choice.path, self.family)
            check_fits(concept, unet, text_root, embeddings=False)
            loras.append(RegionLora(choice.region, concept, choice.weight, choice.name))
        self.region_loras = loras
        root = self.family.pooled_root
        # regions whose LoRAs change the encoder the UNet's vector input is pooled from
        self.pooled_regions = sorted({lora.region for lora in loras if lora.weight and root is not None
                                      and any(name.startswith(root) for name in lora.concept.text_lora)})
        if not self.spec.passes:  # with passes, each pass has its own (`_build_plan`)
            self.unet_deltas = RegionDeltas(unet, loras, len(self.spec.regions),
                                            vectors=bool(self.pooled_regions)) or None
        self.lora_notes = "; ".join(
            f"region {c.region}: {c.name} {c.weight:g}" + ("" if c.source == "listed" else f" ({c.source})")
            for c in choices)

    @property
    def needed(self) -> bool:
        """Whether this generation has anything to bind or any region."""
        return bool(self.binder.rows or self.spec.regions or self.processor.error)

    def record_infotext(self) -> None:
        if self.spec.regions:
            self.p.extra_generation_params[REGIONS_KEY] = self.spec.to_json()
        if self.sources:
            self.p.extra_generation_params[CONCEPTS_KEY] = self.sources
        if self.lora_notes:
            self.p.extra_generation_params[REGION_LORAS_KEY] = self.lora_notes

    # ------------------------------------------------------------------------ hooks on the UNet
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self.p.mos_job = self
        deltas = self.unet_deltas
        unet = mos_host.unet_of(shared.sd_model)
        try:
            with attn2_processor(unet, self.processor), \
                    mos_host.ROW.call_rows(unet, self.processor.begin_call, self._step_rows), \
                    (deltas.installed() if deltas else contextlib.nullcontext()), \
                    (self._passes_installed() if self.spec.passes else contextlib.nullcontext()):
                self.processor.inner.context_delta = deltas.context_delta if deltas else None
                if deltas and deltas.vectors:
                    deltas.vector_changes = self.processor.vector_changes
                yield
        finally:
            self.processor.inner.context_delta = None
            if deltas:
                deltas.vector_changes = None
            self.processor.clear()
            if getattr(self.p, "mos_job", None) is self:
                del self.p.mos_job

    def _step_rows(self) -> tuple[int, int]:
        """This step's (cond, uncond) row counts; the error of this step's plan, if it failed."""
        if self.processor.error is not None:
            raise self.processor.error
        return self.step_rows

    @contextlib.contextmanager
    def _passes_installed(self) -> Iterator[None]:
        """Route each UNet call through this step's region passes (`regional.passes`): the call runs
        once per pass on the same rows, each with its masks and LoRAs, and returns their blend."""
        unet = mos_host.unet_of(shared.sd_model)
        own = unet.__dict__.get("forward")
        original = unet.forward

        def forward(x, *args, **kwargs):
            if not self.passes or self.processor.error is not None:
                return original(x, *args, **kwargs)
            out = None
            with self.processor.same_rows(x.shape[0]):
                for run in self.passes:
                    self.processor.use_pass(run.masks, run.deltas.context_delta if run.deltas else None)
                    with run.deltas.installed() if run.deltas else contextlib.nullcontext():
                        eps = original(x, *args, **kwargs) * run.share.to(x.device, x.dtype)
                    out = eps if out is None else out.add_(eps)
            self.processor.use_pass(None, None)
            return out

        unet.forward = forward
        try:
            yield
        finally:
            if own is None:
                unet.__dict__.pop("forward", None)
            else:
                unet.forward = own

    def attach(self) -> None:
        """Install for the rest of the generation; removed by `uninstall` or at the latest by
        `p.close()` (the host closes every processing object in `finally`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.installed())
        self._installed = stack
        close = self.p.close

        def close_and_uninstall():
            try:
                self.uninstall()
            finally:
                close()

        self.p.close = close_and_uninstall

    def uninstall(self) -> None:
        stack, self._installed = self._installed, None
        if stack is not None:
            stack.close()

    # --------------------------------------------------------------------------- every step
    def on_step(self, params) -> None:
        if self.processor.error is not None:
            return
        try:
            self._plan(params)
        except BaseException as e:  # the host only logs callback errors: fail the next UNet call
            self.processor.error = e

    def encode(self, prompts: list[str], negative: bool = False, loras: tuple = ()) -> torch.Tensor:
        """[n, L, T, D] through the host's encoder (binding concept tokens), as prompts or as
        negative prompts, cached per set of region LoRAs (`loras`, their key; applied by the caller)."""
        return mos_host_binding.encode_bound(shared.sd_model, self.binder, prompts,
                                             self.caches.setdefault((loras, negative), {}), self.family, negative,
                                             self.bound_vectors.setdefault((loras, negative), {}))

    def _bound_vector_changes(self, prompts: Sequence[str], negative: bool) -> torch.Tensor | None:
        """[n, V]: how binding changes each prompt's vector input (SDXL; zero for a prompt without
        concept tokens), after `encode` of the same prompts; None for a family without a vector."""
        if not self.family.dict_conditioning:
            return None
        changes = self.bound_vectors.get(((), negative), {})
        found = [changes.get(p) for p in prompts]
        like = next(c for c in found if c is not None)
        return torch.stack([like.new_zeros(like.shape) if c is None else c for c in found])

    def _text_loras(self, region: int) -> tuple[tuple, list[RegionLora]]:
        """(a key naming them, the LoRAs) that change region `region`'s text encoding."""
        loras = text_loras_of(self.region_loras, region)
        return tuple((lora.name, lora.weight) for lora in loras), loras

    def encode_regions(self, texts: list[str], negative: bool = False) -> torch.Tensor:
        """[K, L, T, D]: region k's text (prompt or negative) encoded with its LoRAs' text-encoder
        changes (regions with the same LoRAs in one call, each set's encodings cached)."""
        groups: dict[tuple, list[int]] = {}
        for k in range(len(texts)):
            groups.setdefault(self._text_loras(k)[0], []).append(k)
        out: list[torch.Tensor | None] = [None] * len(texts)
        for key, members in groups.items():
            prompts = [texts[k] for k in members]
            with self.text_root.changed(self._text_loras(members[0])[1]) if key else contextlib.nullcontext():
                encoded = self.encode(prompts, negative, key)
            for k, e in zip(members, _common_length(*encoded.unbind(0))):
                out[k] = e
        return torch.stack(_common_length(*out))

    def _schedules(self, prompts: list[str], hires: bool) -> list[list[tuple[int, str]]]:
        """Each prompt's [(last step, text)] as the host schedules it for this pass."""
        p = self.p
        hires_steps = None
        if hires:
            steps = p.hr_second_pass_steps or p.steps
            config = sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
            hires_steps = config.total_steps(steps) if config else steps
        return prompt_parser.get_learned_conditioning_prompt_schedules(
            prompts, p.firstpass_steps, hires_steps, shared.opts.use_old_scheduling)

    def _texts_now(self, prompts: list[str], step: int, hires: bool) -> tuple[str, ...]:
        """Each prompt's text at denoiser step `step`, as the host's prompt schedules pick it."""
        return tuple(_at(step, s) for s in self._schedules(prompts, hires))

    def _vectors_now(self, prompts: list[str], negative: bool, region: int, step: int, hires: bool) -> torch.Tensor:
        """[n, V]: each prompt's vector input at this step, encoded as the host encodes it (each
        prompt's scheduled texts as one batch, so an empty negative is zeros as there) with region
        `region`'s text-encoder LoRAs, or with none for region -1. Cached per prompt."""
        key, loras = self._text_loras(region) if region >= 0 else ((), [])
        out = []
        for prompt, schedule in zip(prompts, self._schedules(prompts, hires)):
            entry = self.vector_cache.get((key, negative, hires, prompt))
            if entry is None:
                batch = prompt_parser.SdConditioning([text for _, text in schedule], is_negative_prompt=negative)
                with torch.no_grad(), (self.text_root.changed(loras) if loras else contextlib.nullcontext()):
                    vector = shared.sd_model.get_learned_conditioning(batch)["vector"]
                entry = self.vector_cache[(key, negative, hires, prompt)] = ([end for end, _ in schedule], vector)
            ends, vectors = entry
            out.append(vectors[_step_index(step, ends)])
        return torch.stack(out)

    def _vector_changes(self, step: int, hires: bool, n_cond: int, n_uncond: int) -> torch.Tensor | None:
        """[R, K, V]: how region k's LoRAs change each row's vector input (the pooled part; the size
        part, encoded alike both times, cancels), rows in the host's order: one cond row per prompt
        or AND part, then one uncond row per negative. None when no region LoRA changes the pooled
        encoder."""
        if not self.pooled_regions:
            return None
        p = self.p
        prompts = list(p.hr_prompts if hires else p.prompts)
        negatives = list(p.hr_negative_prompts if hires else p.negative_prompts) if n_uncond else []
        per_image, flat, _ = prompt_parser.get_multicond_prompt_list(prompts)
        rows = [index for parts in per_image for index, _ in parts]
        if len(rows) != n_cond or len(negatives) != n_uncond:
            raise RuntimeError(f"Mix-of-Show: the step has {n_cond} cond and {n_uncond} uncond rows, the prompts "
                               f"give {len(rows)} and {len(negatives)}")
        if len(rows) != len(prompts) and not mos_host.ROW.AND_PARTS_APART:
            raise ConceptError(f"AND in the prompt cannot be combined with a region LoRA that changes the pooled text "
                               f"encoder in {mos_host.HOST.title}: its UNet calls do not say which part a row is")
        index = torch.tensor(rows)
        base_cond = self._vectors_now(flat, False, -1, step, hires)
        base_uncond = self._vectors_now(negatives, True, -1, step, hires)
        changes = base_cond.new_zeros(n_cond + n_uncond, len(self.spec.regions), base_cond.shape[-1])
        for k in self.pooled_regions:
            cond = self._vectors_now(flat, False, k, step, hires) - base_cond
            uncond = self._vectors_now(negatives, True, k, step, hires) - base_uncond
            changes[:, k] = torch.cat([cond.index_select(0, index.to(cond.device)), uncond])
        return changes

    def _plan(self, params) -> None:
        p = self.p
        hires = bool(getattr(p, "is_hr_pass", False))
        step = params.denoiser.step
        prompts = self._texts_now(list(p.hr_prompts if hires else p.prompts), step, hires)
        text_cond = self.family.crossattn(params.text_cond)
        # Forge has no uncond rows at all at CFG scale 1 (A1111 still encodes the negatives)
        text_uncond = text_cond[:0] if params.text_uncond is None else self.family.crossattn(params.text_uncond)
        negatives = self._texts_now(list(p.hr_negative_prompts if hires else p.negative_prompts), step, hires) \
            if params.text_uncond is not None else ()
        n_cond, n_uncond = text_cond.shape[0], text_uncond.shape[0]
        self.step_rows = (n_cond, n_uncond)
        height, width = params.x.shape[-2] * 8, params.x.shape[-1] * 8
        key = (n_cond, n_uncond, width, height, prompts, negatives)
        if key not in self.plans:
            plan = self._build_plan(params, text_uncond, n_cond, n_uncond, width, height, prompts, negatives)
            self.plans = {key: (*plan, self._vector_changes(step, hires, n_cond, n_uncond))}
        region, rows, weights, levels, cond, uncond, global_weight, passes, bound, vectors = self.plans[key]
        for name, change in zip(("text_cond", "text_uncond"), bound):
            if change is not None:  # the bound prompts' pooled text, in a copy of the host's conditioning
                conditioning = getattr(params, name)
                conditioning = type(conditioning)(conditioning)
                conditioning["vector"] = conditioning["vector"] + change.to(conditioning["vector"])
                setattr(params, name, conditioning)
        self.passes = passes
        for run in passes:
            if run.deltas is not None and run.deltas.vectors:
                run.deltas.vector_changes = self.processor.vector_changes
        context = None
        if cond is not None or uncond is not None:  # the host's own rows change with prompt editing
            layers = self.binder.layers
            if cond is None:
                cond = text_cond.unsqueeze(1).expand(-1, layers, -1, -1)
            if uncond is None:
                uncond = text_uncond.unsqueeze(1).expand(-1, layers, -1, -1)
            cond, uncond = _common_length(cond.to(text_cond.dtype), uncond.to(text_cond.dtype))
            context = torch.cat([cond, uncond]).to(region.device)
        if self.unet_deltas:
            self.unet_deltas.set_masks(levels)
        self.processor.set_step(region, weights, context, global_weight, rows, vectors)

    def _level_masks(self, width: int, height: int) -> dict[tuple[int, int], torch.Tensor]:
        """Region masks at every UNet level for this size (px boxes refer to the first pass)."""
        if (width, height) not in self.masks:
            self.masks[(width, height)] = (
                level_masks(self.spec, width, height, base_size=(self.p.width, self.p.height), family=self.family)
                if self.spec.regions else {(h, w): torch.zeros(1, h * w)
                                           for h, w in self.family.level_sizes(width, height)})
        return self.masks[(width, height)]

    def _build_plan(self, params, text_uncond: torch.Tensor, n_cond: int, n_uncond: int, width: int, height: int,
                    prompts: tuple[str, ...], negatives: tuple[str, ...]) -> tuple:
        device = params.x.device
        regions = self.spec.regions
        global_weight = None
        if regions:
            texts, negs = [r.text for r in regions], [r.negative for r in regions]
            pos, neg = _common_length(self.encode_regions(texts), self.encode_regions(negs, True))  # [K, L, T, D]
            if any(self.spec.global_weights()):
                global_weight = torch.tensor(self.spec.global_weights(), device=device)
            if not any(self.binder.concept_tokens_in(t) for t in texts + negs):
                pos, neg = pos[:, 0], neg[:, 0]  # the same context at every layer: [K, T, D], no layer copies
            else:
                pos, neg = pos.transpose(0, 1), neg.transpose(0, 1)  # [L, K, T, D]
            # the distinct region contexts, [2, (L,) K, T, D]: every cond row uses 0, every uncond row 1
            region = torch.stack([pos, neg])
            rows = torch.tensor([0] * n_cond + [1] * n_uncond, device=device)
        else:  # binding only: no region, all-zero weights make every layer plain attention
            region = text_uncond.new_zeros(1, 1, 1, text_uncond.shape[-1])
            rows = torch.zeros(n_cond + n_uncond, dtype=torch.long, device=device)
        levels = {size: m.to(device) for size, m in self._level_masks(width, height).items()}
        weights = [levels[size] for size in attention_sizes(width, height, self.family)]
        cond = uncond = None
        bound: list[torch.Tensor | None] = [None, None]  # SDXL: binding's vector changes, cond and uncond rows
        if self.binder.rows and any(self.binder.concept_tokens_in(q) for q in prompts):
            if n_cond != len(prompts):
                raise ConceptError("concept tokens cannot be combined with AND in the prompt")
            cond = self.encode(list(prompts)).to(device)  # [B, L, T, D]
            bound[0] = self._bound_vector_changes(prompts, False)
        if self.binder.rows and any(self.binder.concept_tokens_in(q) for q in negatives):
            uncond = self.encode(list(negatives), True).to(device)
            bound[1] = self._bound_vector_changes(negatives, True)
        passes = []
        if self.spec.passes and self.region_loras:
            latent = region_masks(self.spec, width, height, base_size=(self.p.width, self.p.height)).to(device)
            passes = region_passes(mos_host.unet_of(shared.sd_model), self.region_loras, levels, weights, latent,
                                   self.pooled_regions, self.spec.pass_unet_weight)
        return region.to(device), rows, weights, levels, cond, uncond, global_weight, passes, bound


def _step_index(step: int, ends: list[int]) -> int:
    """Which entry of a prompt schedule (its entries' last steps) holds at denoiser step `step`."""
    return next((i for i, end in enumerate(ends) if step <= end), len(ends) - 1)


def _at(step: int, schedule: list[tuple[int, str]]) -> str:
    """The text a prompt schedule gives at denoiser step `step` (its last after the end)."""
    return schedule[_step_index(step, [end for end, _ in schedule])][1]


def job_of(p) -> GenerationJob | None:
    return getattr(p, "mos_job", None)


def on_cfg_denoiser(params) -> None:
    """For `script_callbacks.on_cfg_denoiser`: acts only on a generation that has a job."""
    job = job_of(params.denoiser.p) if params.denoiser is not None else None
    if job is not None:
        job.on_step(params)
