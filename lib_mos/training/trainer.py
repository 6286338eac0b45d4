"""ED-LoRA training: one concept from a folder of images (the paper's "single client").

A concept is a few user tokens, each with one embedding row per UNet cross-attention layer, plus
rank-r LoRA on the text encoder's 48 and the UNet's 128 attention linears. Training follows the
authors' recipe (see docs/training.md): the first token starts random N(0, 0.013^2), the last from a
class word; learning rates 1e-3 (rows) / 1e-5 (text LoRA) / 1e-4 (UNet LoRA); AdamW (weight decay
0.01) with linear decay; eps-MSE on the subject mask (or on the pasted image area); rows stop
training once their mean L2 norm reaches 0.55; an optional cross-attention regulariser keeps the
concept tokens' attention inside the subject. `kind="lora"` trains a plain kohya-style LoRA on the
same layers, found in prompts by trigger words.

Nothing here writes the model's weights. The LoRA lives in forward hooks and the concept rows are
injected into the token embedding output (binding's `_rows_injected`), so the embedding table's
other rows are never touched — the authors reset them after every step; here they cannot move —
and a model shared with the WebUI is bit-identical afterwards. Hooks, attention processors and
`requires_grad` flags are restored in `finally`.

Every random draw comes from generators whose state is checkpointed (data order, augmentation,
captions: `random.Random`; noise, timesteps, VAE posterior samples: a CPU `torch.Generator`), so
N steps in one go equal N/2 steps, a checkpoint and a resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lib_mos import allocator
from lib_mos.concepts.binding import PromptBinder, encode_ids, rows_injected, tokenize
from lib_mos.concepts.concept import Concept, LoraFactor, input_embedding_table
from lib_mos.concepts.files import check_concept_set, read_concept, write_concept
from lib_mos.files import atomic_save_safetensors
from lib_mos.models import sampling
from lib_mos.models.attention import LayerwiseContext, attn2_processor
from lib_mos.models.sd1 import SD1Model, text_lora_linear_names, unet_attention_linear_names
from lib_mos.training.data import PLACEHOLDER, TEMPLATES, TrainingImage, augment_view, make_caption

if TYPE_CHECKING:
    from lib_mos.models.sdxl import SDXLModel

__all__ = [
    "STATE_SUFFIX",
    "ConceptTrainer",
    "TrainProgress",
    "TrainSettings",
    "TrainingError",
    "TrainingInterrupted",
    "state_path",
    "train",
]

TEXT_BATCH = 16  # layer copies of captions through the text encoders at once (`_encode_copies`)
STATE_SUFFIX = ".train-state"  # `<out>.train-state`: not a .safetensors, so the host's Lora list skips it
STATE_FORMAT = "mos_train_state"
STATE_VERSION = 1
KINDS = ("edlora", "lora")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class TrainingError(ValueError):
    """Unusable settings or resume state; the message names the field or file."""


class TrainingInterrupted(Exception):
    """Training stopped between steps on request; `step` is the last completed step and
    `checkpoint` the last complete checkpoint written (None: none was)."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"interrupted after step {step}; {where}")
        self.step, self.checkpoint = step, checkpoint


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a run. Defaults are the authors' ED-LoRA settings for a character."""

    tokens: tuple[str, ...] = ("<concept1>", "<concept2>")
    class_word: str | None = None  # initialises the last token; stands for the concept in captions
    kind: str = "edlora"  # "edlora" | "lora" (kohya-style: no embeddings, trigger words)
    trigger: str | None = None  # kind "lora": the words that call the concept
    rank: int = 4
    lr_embedding: float = 1e-3
    lr_text: float = 1e-5
    lr_unet: float = 1e-4
    weight_decay: float = 0.01
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    resolution: int = 512
    seed: int = 0
    init_std: float = 0.013
    norm_stop: float = 0.55  # concept rows stop training at this mean L2 norm (0: never stop)
    masked_loss: bool = True  # eps-MSE on the subject mask where an image has one
    attn_reg_weight: float = 0.0  # the authors use 0.01 with masks
    noise_offset: float = 0.01
    templates: str = "human"  # key of training_data.TEMPLATES
    shuffle_captions: bool = True
    keep_caption_parts: int = 1
    crop_p: float = 0.5
    flip_p: float = 0.0
    views_per_image: int = 8  # augmented views per image, VAE-encoded once and cached
    precision: str = "auto"  # "auto" (fp16 on CUDA, else fp32) | "fp32" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    save_every: int = 0
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_cfg: float = 7.5

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> TrainingError:
            return TrainingError(f"training setting {field!r}: {why}")

        if self.kind not in KINDS:
            raise bad("kind", f"must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "edlora":
            if not self.tokens:
                raise bad("tokens", "an ED-LoRA concept needs at least one token")
            for t in self.tokens:
                if not isinstance(t, str) or not re.fullmatch(r"<[^<>\s]+>", t):
                    raise bad("tokens", f"{t!r} is not a token like <name1> (angle brackets, no spaces)")
            if len(set(self.tokens)) != len(self.tokens):
                raise bad("tokens", "tokens must differ")
        elif not (self.trigger or "").strip():
            raise bad("trigger", "a LoRA (kind 'lora') needs trigger words")
        if self.class_word is not None and not self.class_word.strip():
            raise bad("class_word", "must be a word or None")
        ints = {"rank": self.rank, "steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "views_per_image": self.views_per_image, "sample_steps": self.sample_steps}
        for field, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(field, f"must be a positive integer, got {value!r}")
        for field in ("save_every", "sample_every", "keep_caption_parts", "seed"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(field, f"must be a non-negative integer, got {value!r}")
        if not isinstance(self.resolution, int) or self.resolution < 64 or self.resolution % 64:
            raise bad("resolution", f"must be a multiple of 64 (at least 64), got {self.resolution!r}")
        floats = ("lr_embedding", "lr_text", "lr_unet", "weight_decay", "init_std", "norm_stop", "attn_reg_weight",
                  "noise_offset", "crop_p", "flip_p", "sample_cfg")
        for field in floats:
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise bad(field, f"must be a finite number >= 0, got {value!r}")
        for field in ("crop_p", "flip_p"):
            if getattr(self, field) > 1:
                raise bad(field, "is a probability (0..1)")
        if self.templates not in TEMPLATES:
            raise bad("templates", f"must be one of {sorted(TEMPLATES)}, got {self.templates!r}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        if self.attn_reg_weight and self.kind != "edlora":
            raise bad("attn_reg_weight", "the attention regulariser needs concept tokens (kind 'edlora')")

    @property
    def concept_words(self) -> str:
        """What replaces the caption placeholder: the tokens, or the trigger words."""
        return " ".join(self.tokens) if self.kind == "edlora" else str(self.trigger).strip()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainSettings:
        data = json.loads(text)
        for field in ("tokens", "sample_prompts"):
            data[field] = tuple(data[field])
        return cls(**data)


# Settings that may change on resume: they do not change what the steps compute.
RESUMABLE_CHANGES = frozenset({"save_every", "sample_every", "sample_prompts", "sample_steps", "sample_cfg",
                               "gradient_checkpointing"})


@dataclass
class TrainProgress:
    step: int
    steps: int
    loss: float
    emb_norm: float | None
    steps_per_s: float
    eta_s: float


def state_path(out: str | Path) -> Path:
    """Where the resume state of a run writing `out` lives."""
    out = Path(out)
    return out.with_name(out.name + STATE_SUFFIX)


# ------------------------------------------------------------------------------------------ LoRA


class LoraHooks:
    """Trainable rank-r LoRA (`x -> W x + up(down(x))`, scale 1 as the authors) on named linears,
    applied by forward hooks so the layers' weights are never written."""

    def __init__(self, root: nn.Module, names: Sequence[str], rank: int, gen: torch.Generator,
                 device: torch.device) -> None:
        self.root, self.names = root, list(names)
        self.down: dict[str, nn.Parameter] = {}
        self.up: dict[str, nn.Parameter] = {}
        for name in self.names:
            layer = root.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise TrainingError(f"{name} is a {type(layer).__name__}, not a linear layer")
            bound = 1.0 / math.sqrt(layer.in_features)  # kaiming-uniform(a=sqrt(5)), as LoRA inits
            down = (torch.rand(rank, layer.in_features, generator=gen) * 2 - 1) * bound
            self.down[name] = nn.Parameter(down.to(device))
            self.up[name] = nn.Parameter(torch.zeros(layer.out_features, rank, device=device))
        self._handles: list[Any] = []

    def parameters(self) -> list[nn.Parameter]:
        return [p for name in self.names for p in (self.down[name], self.up[name])]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> torch.Tensor:
            down, up = self.down[name], self.up[name]
            x = args[0]
            return output + F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype)).to(output.dtype)

        try:
            for name in self.names:
                layer = self.root.get_submodule(name)
                self._handles.append(layer.register_forward_hook(
                    lambda m, a, o, _n=name: hook(m, a, o, _n)))
            yield
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def factors(self) -> dict[str, LoraFactor]:
        return {name: LoraFactor(down=self.down[name].detach().float().cpu().clone(),
                                 up=self.up[name].detach().float().cpu().clone(), scale=1.0) for name in self.names}


# ---------------------------------------------------------------------------- model preparation


@contextlib.contextmanager
def _frozen(model: SD1Model | SDXLModel) -> Iterator[None]:
    """Base parameters need no gradient; their flags are put back afterwards."""
    params = [*model.unet.parameters(), *model.text_root.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def _own_checkpointing(unet: nn.Module, enabled: bool, text_encoders: Sequence[nn.Module] = ()) -> Iterator[None]:
    """ldm's blocks checkpoint with their own CheckpointFunction when built with use_checkpoint (the
    host's SD1 config does); that function returns gradients only for the block's own parameters,
    so a hooked LoRA would silently get none. Its flags are switched off for the run, and with
    `enabled` torch's non-reentrant checkpointing (which follows every parameter) wraps each UNet
    block instead, and each layer of the `text_encoders`: a caption with concept tokens goes
    through them once per cross-attention layer, and without checkpointing SDXL keeps about 19 GB
    of their activations per caption in fp32 (70 copies of CLIP-L and bigG, 16 floats per width
    and token in every layer); with it, each layer's input (0.4 GB)."""
    flagged = [(m, attr) for m in unet.modules() for attr in ("checkpoint", "use_checkpoint")
               if isinstance(getattr(m, attr, None), bool) and getattr(m, attr)]
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks] if enabled else []
    if enabled:
        blocks += [layer for encoder in text_encoders for layer in encoder.text_model.encoder.layers]
    try:
        for m, attr in flagged:
            setattr(m, attr, False)
        for block in blocks:
            def forward(*args, _b=block, **kwargs):
                if not torch.is_grad_enabled():
                    return type(_b).forward(_b, *args, **kwargs)
                return torch.utils.checkpoint.checkpoint(type(_b).forward, _b, *args, use_reentrant=False, **kwargs)

            block.forward = forward
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
        for m, attr in flagged:
            setattr(m, attr, True)


class _AttentionRecorder(LayerwiseContext):
    """Layer-wise attention that also keeps each layer's head-averaged attention probabilities on
    the concept-token positions (for the regulariser); computed explicitly, not by SDPA."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # [B, n_tokens]: each concept token's first position
        self.maps: list[torch.Tensor] = []  # per layer [B, N, n_tokens]

    def __call__(self, module: nn.Module, layer: int, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None or self.slots is None:
            return super().__call__(module, layer, x, context)
        if context.dim() == 4:
            context = context[:, layer]
        h = module.heads
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * (inner // h) ** -0.5).float().softmax(-1)  # [B, h, N, T]
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, inner)
        index = self.slots.unsqueeze(1).expand(b, probs.shape[2], self.slots.shape[1])
        self.maps.append(probs.mean(1).gather(-1, index))  # heads averaged, [B, N, n_tokens]
        return module.to_out(out)


def attention_regulariser(maps: Sequence[torch.Tensor], area: torch.Tensor) -> torch.Tensor:
    """The concept tokens' attention outside the subject, scaled as the authors do: per resolution
    the layers' (head-averaged) maps are averaged, each token's map is divided by its maximum over
    the batch, its mean over the pixels outside `area` [B, 1, h, w] is taken, and these are summed
    over tokens and resolutions. A batch with no pixel outside contributes nothing."""
    by_size: dict[int, list[torch.Tensor]] = {}
    for m in maps:  # [B, N, n_tokens]
        by_size.setdefault(m.shape[1], []).append(m)
    total = area.new_zeros(())
    for n, group in by_size.items():
        side = math.isqrt(n)
        m = torch.stack(group).mean(0).float()
        scaled = m / m.amax((0, 1), keepdim=True).clamp_min(1e-12)
        outside = (F.interpolate(area.float(), size=(side, side), mode="nearest").flatten(1) == 0)  # [B, N]
        if outside.any():
            total = total + scaled[outside].mean(0).sum()
    return total


def masked_eps_loss(pred: torch.Tensor, noise: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """The authors' loss: per sample, the squared error summed over the latent channels and
    averaged over the pixels of `area` [B, 1, h, w] (soft edges weigh in part), then the batch mean."""
    err = (pred.float() - noise.float()).pow(2) * area
    return (err.sum((1, 2, 3)) / area.sum((1, 2, 3)).clamp_min(1e-6)).mean()


# ------------------------------------------------------------------------------------------ data


@dataclass
class _Views:
    """Augmented views of every image, VAE-encoded once: posterior mean/std and latent-size masks."""

    mean: torch.Tensor  # [V, 4, h, w]
    std: torch.Tensor
    area: torch.Tensor  # [V, 1, h, w]: loss mask (subject where known and wanted, else the image area)
    subject: torch.Tensor  # [V, 1, h, w]: for the regulariser (the image area where no mask)
    image: list[int]  # view -> image index


def _encode_views(images: Sequence[TrainingImage], settings: TrainSettings, encoder: Callable, device: torch.device,
                  batch: int = 4) -> _Views:
    rng = random.Random(settings.seed)
    views = [(i, augment_view(item, settings.resolution, rng, crop_p=settings.crop_p, flip_p=settings.flip_p))
             for i, item in enumerate(images) for _ in range(settings.views_per_image)]
    means, stds = [], []
    for start in range(0, len(views), batch):
        pixels = torch.stack([v.pixels for _, v in views[start:start + batch]]).to(device)
        mean, std = encoder(pixels)
        means.append(mean.float().to(device))
        stds.append(std.float().to(device))
    area = torch.stack([v.image_area for _, v in views])
    subject = torch.stack([v.subject if v.subject is not None else v.image_area for _, v in views])
    loss_area = subject if settings.masked_loss else area
    return _Views(mean=torch.cat(means), std=torch.cat(stds), area=loss_area.to(device), subject=subject.to(device),
                  image=[i for i, _ in views])


def data_fingerprint(images: Sequence[TrainingImage]) -> str:
    """What a resume must see again: file names, pixels, captions and masks."""
    h = hashlib.sha256()
    for item in images:
        h.update(item.path.name.encode())
        h.update(item.caption.encode())
        h.update(item.image.tobytes())
        if item.mask is not None:
            h.update(item.mask.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- trainer


def _device_of(model: SD1Model) -> torch.device:
    return next(model.unet.parameters()).device


def _autocast_dtype(settings: TrainSettings, model: SD1Model, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). Trained parameters stay fp32 either way."""
    precision = settings.precision
    weights = next(model.unet.parameters()).dtype
    if precision == "auto":
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weights, "fp16" if device.type == "cuda"
                                                                          else "fp32")
    if precision == "fp32" and weights != torch.float32:
        raise TrainingError(f"training setting 'precision': the model's weights are {weights}, so fp32 training is not "
                            "possible; use auto, fp16 or bf16 (or load the model in full precision)")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class ConceptTrainer:
    """One training run on `model` (which it never writes). Use inside `with trainer.installed():`."""

    def __init__(self, model: SD1Model | SDXLModel, settings: TrainSettings, images: Sequence[TrainingImage], *,
                 encoder: Callable, name: str | None = None) -> None:
        if not images:
            raise TrainingError("no training images")
        self.model, self.settings, self.images = model, settings, list(images)
        self.data_fingerprint = data_fingerprint(self.images)  # hashed once: every saved state and a resume use it
        self.name = name or (settings.tokens[0].strip("<>").rstrip("0123456789") if settings.kind == "edlora"
                             else str(settings.trigger).split(",")[0].strip())
        self.device = _device_of(model)
        self.autocast = _autocast_dtype(settings, model, self.device)
        self.gen = torch.Generator(device="cpu").manual_seed(settings.seed)
        self.rng = random.Random(settings.seed + 1)
        self.step = 0
        self.layers = model.family.layers
        self.rows = nn.Parameter(self._initial_rows()) if settings.kind == "edlora" else None
        self.frozen_rows = False
        self.text_lora = LoraHooks(model.text_root, text_lora_linear_names(model), settings.rank, self.gen, self.device)
        self.unet_lora = LoraHooks(model.unet, unet_attention_linear_names(model.family), settings.rank, self.gen,
                                   self.device)
        groups = [{"params": self.unet_lora.parameters(), "lr": settings.lr_unet, "name": "unet"}]
        if settings.lr_text > 0:
            groups.append({"params": self.text_lora.parameters(), "lr": settings.lr_text, "name": "text"})
        if self.rows is not None:
            groups.append({"params": [self.rows], "lr": settings.lr_embedding, "name": "embedding"})
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr_unet, betas=(0.9, 0.999),
                                           weight_decay=settings.weight_decay)
        scaler_cls = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler
        use_scaler = self.autocast == torch.float16 and self.device.type == "cuda"
        self.scaler = scaler_cls("cuda", enabled=use_scaler) if scaler_cls is not torch.cuda.amp.GradScaler \
            else scaler_cls(enabled=use_scaler)
        self.views: _Views | None = None
        self.encoder = encoder
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._order: list[int] = []
        self.binder = PromptBinder(model, [self._concept_stub()]) if self.rows is not None else None

    # ---- initial state

    def _initial_rows(self) -> torch.Tensor:
        s = self.settings
        # SDXL: a row is CLIP-L's input embedding then bigG's (`binding`), so the class word's is both
        tables = [input_embedding_table(m) for m in self.model.family.text_encoder_modules(self.model.text_root)]
        dim = sum(table.shape[1] for table in tables)
        rows = []
        for i, _ in enumerate(s.tokens):
            if s.class_word and i == len(s.tokens) - 1:
                ids = self.model.tokenizer(s.class_word, add_special_tokens=False)["input_ids"]
                if len(ids) != 1:
                    raise TrainingError(f"training setting 'class_word': {s.class_word!r} is {len(ids)} tokens for the "
                                        "tokenizer; it must be one (e.g. man, woman, dog, cat, chair)")
                row = torch.cat([table[ids[0]].detach().float().cpu() for table in tables])
            else:
                row = torch.randn(dim, generator=self.gen) * s.init_std
            rows.append(row.unsqueeze(0).expand(self.layers, dim))
        return torch.stack(rows).contiguous().to(self.device)

    def _concept_stub(self) -> Concept:
        return Concept(name=self.name, tokens=self.settings.tokens, embeddings=self.rows.detach(),
                       family=self.model.family)

    # ---- the run

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Hooks and flags for training (and sampling) on the shared model, all undone on exit."""
        model = self.model
        text_hooks = self.text_lora.applied() if self.settings.lr_text > 0 or self._text_lora_nonzero() \
            else contextlib.nullcontext()
        encoders = model.family.text_encoder_modules(model.text_root)
        with _frozen(model), _own_checkpointing(model.unet, self.settings.gradient_checkpointing, encoders), \
                self.unet_lora.applied(), text_hooks, sampling.any_multiple_of_8():
            was_training = (model.unet.training, model.text_root.training)
            try:
                yield
            finally:
                model.unet.train(was_training[0])
                model.text_root.train(was_training[1])

    def _text_lora_nonzero(self) -> bool:
        return any(bool(p.any()) for p in self.text_lora.up.values())

    def prepare(self) -> None:
        """Encode every augmented view once (the VAE is not needed after this)."""
        if self.views is None:
            with torch.no_grad():
                self.views = _encode_views(self.images, self.settings, self.encoder, self.device)

    def _next_views(self) -> list[int]:
        """Images in shuffled epochs, a random cached view of each."""
        picked = []
        per = self.settings.views_per_image
        for _ in range(self.settings.batch_size):
            if not self._order:
                self._order = list(range(len(self.images)))
                self.rng.shuffle(self._order)
            image = self._order.pop()
            picked.append(image * per + self.rng.randrange(per))
        return picked

    def _captions(self, picked: Sequence[int]) -> list[str]:
        s = self.settings
        return [make_caption(self.images[self.views.image[v]].caption, s.concept_words, self.rng,
                             templates=TEMPLATES[s.templates], shuffle=s.shuffle_captions,
                             keep_parts=s.keep_caption_parts) for v in picked]

    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor | None]:
        """What the UNet is called with for the captions: the context [B, L, 77, D] (ED-LoRA) or
        [B, 77, D] (LoRA), for SDXL in {"crossattn": it, "vector": [B, V]} (the pooled text, for
        ED-LoRA the mean over the layer copies as `binding` defines it, and the training size);
        and each concept token's first position [B, n_tokens] (ED-LoRA; captions hold every token)."""
        if self.rows is None:
            if self.settings.lr_text == 0:  # frozen text encoders: their outputs are cached
                todo = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
                if todo:
                    with torch.no_grad():
                        context, pooled = encode_ids(self.model, tokenize(self.model, todo).to(self.device))
                    for i, c in enumerate(todo):
                        self._text_cache[c] = (context[i], None if pooled is None else pooled[i])
                    if len(self._text_cache) > 4096:
                        self._text_cache.clear()
                found = [self._text_cache[c] for c in captions]
                context = torch.stack([z for z, _ in found])
                pooled = None if found[0][1] is None else torch.stack([p for _, p in found])
            else:
                context, pooled = encode_ids(self.model, tokenize(self.model, list(captions)).to(self.device))
            return self._conditioning(context, pooled), None
        L = self.layers
        tokenized = [self.binder.tokenize_bound(c) for c in captions]
        ids = torch.tensor([t[0] for t in tokenized], dtype=torch.long, device=self.device)
        slots = torch.zeros(ids.shape, dtype=torch.bool, device=self.device)
        token_index = {t: i for i, t in enumerate(self.settings.tokens)}
        first = torch.zeros(len(captions), len(token_index), dtype=torch.long)
        which, layer = [], []
        for b, (_, found) in enumerate(tokenized):
            slots[b, [pos for pos, _ in found]] = True
            for pos, token in reversed(found):
                first[b, token_index[token]] = pos
            for lyr in range(L):
                for _, token in found:
                    which.append(token_index[token])
                    layer.append(lyr)
        mask = slots.repeat_interleave(L, dim=0)
        rows = self.rows[torch.tensor(which, dtype=torch.long, device=self.device),
                         torch.tensor(layer, dtype=torch.long, device=self.device)]
        z, pooled = self._encode_copies(ids.repeat_interleave(L, dim=0), mask, rows)
        context = z.reshape(len(captions), L, *z.shape[1:])
        if pooled is not None:
            pooled = pooled.reshape(len(captions), L, -1).mean(1)
        return self._conditioning(context, pooled), first.to(self.device)

    def _encode_copies(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`encode_ids` of the layer copies with `rows` injected where `mask` is, `TEXT_BATCH` copies
        at a time (the rows in mask order): one call for SD1's 16 copies of a caption, five for
        SDXL's 70, the memory they freed returned after each (`_return_freed_memory`)."""
        out, start = [], 0
        offsets = torch.cumsum(mask.sum(1), 0).tolist()
        for first in range(0, ids.shape[0], TEXT_BATCH):
            last = min(first + TEXT_BATCH, ids.shape[0])
            end = int(offsets[last - 1])
            with rows_injected(self.model, mask[first:last], rows[start:end]):
                out.append(encode_ids(self.model, ids[first:last]))
            self._return_freed_memory()
            start = end
        z = torch.cat([context for context, _ in out])
        return z, None if out[0][1] is None else torch.cat([pooled for _, pooled in out])

    def _conditioning(self, context: torch.Tensor, pooled: torch.Tensor | None
                      ) -> torch.Tensor | dict[str, torch.Tensor]:
        if pooled is None:
            return context
        size = self.settings.resolution
        return {"crossattn": context, "vector": self.model.vector(pooled, size, size)}

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's noise prediction for `cond` as `encode_text` gives it (call inside an attn2
        processor for layer-wise contexts)."""
        if isinstance(cond, dict):
            context = cond["crossattn"]
            extra = {"y": cond["vector"]}
        else:
            context, extra = cond, {}
        return self.model.unet(x.to(context.dtype) if self.autocast is None else x, t, context=context, **extra)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast in the run's dtype, or nothing: torch 2.1's CPU autocast refuses any dtype but
        bf16 even when disabled."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def lrs(self) -> list[float]:
        """Linear decay to 0 over the run, per group."""
        frac = 1.0 - self.step / self.settings.steps
        return [lr * frac for lr in self.base_lrs]

    def train_step(self) -> tuple[float, float | None]:
        """One optimizer step (grad_accum micro-batches); returns (loss, mean row norm)."""
        s, model = self.settings, self.model
        self.prepare()
        model.unet.train()
        model.text_root.train()
        for group, lr in zip(self.optimizer.param_groups, self.lrs()):
            group["lr"] = lr
        ac = model.alphas_cumprod.to(self.device, torch.float32)
        total = 0.0
        recorder = _AttentionRecorder() if s.attn_reg_weight > 0 else LayerwiseContext()
        for _ in range(s.grad_accum):
            picked = self._next_views()
            captions = self._captions(picked)
            index = torch.tensor(picked, device=self.device)
            v = self.views
            x0 = v.mean[index] + v.std[index] * torch.randn(v.mean[index].shape, generator=self.gen).to(self.device)
            b = x0.shape[0]
            noise = torch.randn(x0.shape, generator=self.gen)
            noise = (noise + s.noise_offset * torch.randn(b, x0.shape[1], 1, 1, generator=self.gen)).to(self.device)
            t = torch.randint(0, ac.shape[0], (b,), generator=self.gen).to(self.device)
            a = ac[t].reshape(b, 1, 1, 1)
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            # backward inside the processor: gradient checkpointing runs the UNet blocks again then
            with attn2_processor(model.unet, recorder):
                with self._autocast():
                    cond, slots = self.encode_text(captions)
                    if isinstance(recorder, _AttentionRecorder):
                        recorder.slots, recorder.maps = slots, []
                    pred = self.predict(noisy, t, cond)
                loss = masked_eps_loss(pred, noise, v.area[index])
                if isinstance(recorder, _AttentionRecorder) and recorder.maps:
                    loss = loss + s.attn_reg_weight * attention_regulariser(recorder.maps, v.subject[index])
                self.scaler.scale(loss / s.grad_accum).backward()
                self._return_freed_memory()
            total += float(loss.detach()) / s.grad_accum
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total, self._after_step()

    def _return_freed_memory(self) -> None:
        """On the CPU, hand memory the text encoders just freed back to the system. A caption with
        concept tokens goes through them once per cross-attention layer; glibc's malloc keeps the
        freed buffers between the tensors the backward pass keeps instead of returning them
        (full-size SDXL: 7.8 GB of RSS for 1.1 GB of live tensors), and the WebUI holding SDXL in
        fp32 was killed for it. `malloc_trim` returns them (milliseconds); elsewhere (CUDA's own
        caching allocator, no glibc) this does nothing."""
        if self.device.type == "cpu":
            allocator.trim()

    def _after_step(self) -> float | None:
        """The authors' stop: once the concept rows' mean norm reaches `norm_stop` they train no more."""
        if self.rows is None:
            return None
        norm = float(self.rows.detach().norm(dim=-1).mean())
        if not self.frozen_rows and self.settings.norm_stop > 0 and norm >= self.settings.norm_stop:
            self.frozen_rows = True
        self.rows.requires_grad_(not self.frozen_rows)
        return norm

    # ---- results

    def concept(self) -> Concept:
        s = self.settings
        text = self.text_lora.factors() if s.lr_text > 0 else {}
        if self.rows is not None:
            return Concept(name=self.name, tokens=s.tokens, embeddings=self.rows.detach().float().cpu().clone(),
                           unet_lora=self.unet_lora.factors(), text_lora=text, class_word=s.class_word,
                           family=self.model.family)
        triggers = tuple(t.strip() for t in str(s.trigger).split(",") if t.strip())
        return Concept(name=self.name, tokens=(), embeddings=torch.zeros(0, self.layers, 0),
                       unet_lora=self.unet_lora.factors(), text_lora=text, class_word=s.class_word,
                       triggers=triggers, trigger_source="the trainer", family=self.model.family)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], decoder: Callable | None) -> list[Image.Image]:
        """Preview images of the concept as it is now (the same seed every time)."""
        s = self.settings
        self.model.unet.eval()
        self.model.text_root.eval()
        prompts = [p.replace(PLACEHOLDER, s.concept_words) for p in prompts]
        with self._autocast():
            cond, _ = self.encode_text(prompts)
            uncond, _ = self.encode_text([""] * len(prompts))
            latents = sampling.sample_euler(self.model, cond, uncond, seeds=[s.seed + i for i in range(len(prompts))],
                                            height=s.resolution, width=s.resolution, steps=s.sample_steps,
                                            cfg_scale=s.sample_cfg)
        return decoder(latents.float()) if decoder is not None else sampling.latents_to_images(latents)

    # ---- resume state

    def _named_params(self) -> dict[str, nn.Parameter]:
        named = {f"unet.{n}.down": self.unet_lora.down[n] for n in self.unet_lora.names}
        named |= {f"unet.{n}.up": self.unet_lora.up[n] for n in self.unet_lora.names}
        named |= {f"text.{n}.down": self.text_lora.down[n] for n in self.text_lora.names}
        named |= {f"text.{n}.up": self.text_lora.up[n] for n in self.text_lora.names}
        if self.rows is not None:
            named["rows"] = self.rows
        return named

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata that restore this run exactly (params, AdamW moments, generators)."""
        tensors: dict[str, torch.Tensor] = {}
        steps: dict[str, float] = {}
        for key, p in self._named_params().items():
            tensors[f"param.{key}"] = p.detach().cpu().clone()
            st = self.optimizer.state.get(p)
            if st:
                tensors[f"adam.{key}.exp_avg"] = st["exp_avg"].detach().cpu().clone()
                tensors[f"adam.{key}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().clone()
                steps[key] = float(st["step"])
        tensors["rng.torch"] = self.gen.get_state()
        version, internal, gauss = self.rng.getstate()
        info = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step, "frozen_rows": self.frozen_rows,
                "adam_steps": steps, "rng": [version, list(internal), gauss], "order": self._order,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "data": self.data_fingerprint, "name": self.name}
        return tensors, {"mos_train_state": json.dumps(info), "settings": self.settings.to_json()}

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any], where: str) -> None:
        named = self._named_params()
        want = {f"param.{k}" for k in named}
        if not want <= set(tensors):
            missing = sorted(want - set(tensors))[0]
            raise TrainingError(f"{where}: resume state lacks {missing!r} (written by another kind of run?)")
        for key, p in named.items():
            saved = tensors[f"param.{key}"]
            if saved.shape != p.shape:
                raise TrainingError(f"{where}: {key!r} is {list(saved.shape)} in the state, {list(p.shape)} here "
                                    "(another model or rank?)")
            with torch.no_grad():
                p.copy_(saved.to(p.device, p.dtype))
            if key in info["adam_steps"]:
                step = torch.tensor(info["adam_steps"][key], dtype=torch.float32)
                self.optimizer.state[p] = {"step": step,
                                           "exp_avg": tensors[f"adam.{key}.exp_avg"].to(p.device, p.dtype),
                                           "exp_avg_sq": tensors[f"adam.{key}.exp_avg_sq"].to(p.device, p.dtype)}
        self.gen.set_state(tensors["rng.torch"])
        version, internal, gauss = info["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._order = list(info["order"])
        self.step = int(info["step"])
        self.frozen_rows = bool(info["frozen_rows"])
        if self.rows is not None:
            self.rows.requires_grad_(not self.frozen_rows)
        if info.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(info["scaler"])


# --------------------------------------------------------------------------------------- the loop


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], TrainSettings]:
    from safetensors import safe_open

    where = str(path)
    if not path.is_file():
        raise TrainingError(f"{where}: no resume state here (train without resume, or with save_every > 0 so "
                            "checkpoints are written)")
    try:
        with safe_open(where, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        info = json.loads(meta["mos_train_state"])
        settings = TrainSettings.from_json(meta["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"{where}: not a readable Mix-of-Show training state: {exc}") from None
    if info.get("format") != STATE_FORMAT or info.get("version") != STATE_VERSION:
        raise TrainingError(f"{where}: training state format {info.get('format')!r} v{info.get('version')!r} is not "
                            f"{STATE_FORMAT!r} v{STATE_VERSION}")
    return tensors, info, settings


def _check_resume(saved: TrainSettings, settings: TrainSettings, where: str) -> None:
    for field in dataclasses.fields(TrainSettings):
        if field.name in RESUMABLE_CHANGES:
            continue
        old, new = getattr(saved, field.name), getattr(settings, field.name)
        if old != new:
            raise TrainingError(f"{where}: the run was started with {field.name}={old!r}; resuming with {new!r} would "
                                "not continue it (use the same settings, or start anew)")


def _write_checkpoint(trainer: ConceptTrainer, out: Path) -> Path:
    """The concept as it is now, and the state to resume from; each file appears whole or not at all."""
    tensors, meta = trainer.state()
    atomic_save_safetensors(tensors, state_path(out), metadata=meta, overwrite=True)
    write_concept(trainer.concept(), out, overwrite=True)
    return out


def train(model: SD1Model | SDXLModel, settings: TrainSettings, images: Sequence[TrainingImage], out: str | Path, *,
          encoder: Callable, decoder: Callable | None = None, name: str | None = None, resume: bool = False,
          overwrite: bool = False, progress: Callable[[TrainProgress], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          on_samples: Callable[[int, list[Image.Image]], None] | None = None,
          on_checkpoint: Callable[[int, Path], None] | None = None,
          on_encoded: Callable[[], None] | None = None) -> Concept:
    """Train a concept and write it to `out` (our concept .safetensors, which the WebUI's Lora, the
    regional script and fusion read). With `settings.save_every`, a checkpoint (`out` and its resume
    state `out + STATE_SUFFIX`) is written every that many steps; `resume` continues from it.

    `on_encoded` runs once every training view is encoded (the VAE may leave the GPU then; the
    `decoder` of preview samples is called later). `should_stop` is checked between steps: it ends
    the run with TrainingInterrupted, writing nothing more. Nothing is written before the first checkpoint, and errors found before
    training (settings, existing output, resume state) write nothing at all.
    """
    out = Path(out)
    where = str(out)
    if out.suffix.lower() != ".safetensors":
        raise TrainingError(f"{where}: the concept is written as .safetensors (the WebUI's Lora folder format)")
    state = state_path(out)
    loaded = None
    if resume:
        tensors, info, saved = _read_state(state)
        _check_resume(saved, settings, str(state))
        loaded = (tensors, info)
    elif out.exists() and not overwrite:
        raise TrainingError(f"{where}: already exists (overwrite it, or resume its training)")
    trainer = ConceptTrainer(model, settings, images, encoder=encoder, name=name)
    if trainer.rows is not None:
        check_concept_set([trainer._concept_stub()])
    if loaded is not None:
        if loaded[1].get("data") != trainer.data_fingerprint:
            raise TrainingError(f"{state}: the training images changed since this run started (files, pixels, "
                                "captions or masks); resume needs the same data")
        trainer.load_state(*loaded, where=str(state))
        trainer.name = loaded[1].get("name", trainer.name)
    last_checkpoint = out if resume else None
    with trainer.installed():
        trainer.prepare()
        if on_encoded is not None:
            on_encoded()
        start = time.perf_counter()
        first = trainer.step
        while trainer.step < settings.steps:
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(trainer.step, last_checkpoint)
            loss, norm = trainer.train_step()
            done = trainer.step
            if not math.isfinite(loss):
                raise TrainingError(f"the loss became {loss} at step {done} (lower the learning rates, or use fp32/bf16)")
            if progress is not None:
                elapsed = time.perf_counter() - start
                rate = (done - first) / elapsed if elapsed > 0 else 0.0
                progress(TrainProgress(done, settings.steps, loss, norm, rate,
                                       (settings.steps - done) / rate if rate > 0 else float("inf")))
            if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                last_checkpoint = _write_checkpoint(trainer, out)
                if on_checkpoint is not None:
                    on_checkpoint(done, out)
            if settings.sample_every and done % settings.sample_every == 0 and settings.sample_prompts:
                images_now = trainer.sample(settings.sample_prompts, decoder)
                if on_samples is not None:
                    on_samples(done, images_now)
        concept = trainer.concept()
    write_concept(concept, out, overwrite=True)
    with contextlib.suppress(FileNotFoundError):
        state.unlink()
    return read_concept(out, family=model.family)
