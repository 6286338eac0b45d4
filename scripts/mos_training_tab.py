"""Host glue: the "Mix-of-Show training" tab, which trains one concept on the loaded model.

It reads the UI, builds an `SD1Model` view of the live model (`live_sd1_model`: the host's own
UNet, CLIP text model and tokenizer; nothing is copied) and runs `lib_mos.training.train` under the
host's queue, with a task id so the host's progress bar and live preview show
(javascript/mix_of_show_training.js), and an Interrupt button. The concept is written into the Lora
folder, where the Lora list, the regional script and the fusion tab find it at once.

Around the run, as the host's own embedding training does (modules/textual_inversion/):
- `--lowvram` / `--medvram` are refused: the whole model must stay on the GPU while it trains;
- with "Move VAE and CLIP to RAM when training" (`unload_models_when_training`) the VAE goes to
  the CPU once the images are encoded, comes back for preview samples, and returns at the end;
- Lora networks a generation left merged into the weights are taken out first (`base_weights`),
  so training sees the checkpoint's own weights;
- a generation that bypasses the queue is refused while the model trains (`generation_refused`).
The trainer never writes the model's weights; the loaded model is bit-identical afterwards.

What a new user sees before Train (`on_ui_tabs`):
- only the field the chosen Kind uses (tokens and the attention regulariser for ED-LoRA, trigger
  words for LoRA); the Kind is not kept in ui-config.json, so the page always opens on the Kind
  whose fields it shows;
- steps, batch and resolution proposed for the host's device and its memory
  (`lib_mos.training.plan`), with the estimated time, updated as they change; they are not kept in
  ui-config.json either, where an old default would override the device's proposal;
- a class word to start from ("person") and caption templates that follow it;
- the authors' attention regulariser (0.01), harmless on pictures without masks;
- no gallery until there are preview samples (style.css shows it while a live preview is in it),
  and an Interrupt that is only enabled while a run is going.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from lib_mos.files import import_sibling
from lib_mos.models import sdxl
from lib_mos.models.family import SD1, SDXL, attn2_modules
from lib_mos.models.sd1 import SD1Config, SD1Model
from lib_mos.models.sdxl import SDXLConfig, SDXLModel
from lib_mos.training import plan as training_plan
from lib_mos.training.data import PLACEHOLDER, TEMPLATES
from modules import call_queue, devices, processing, script_callbacks, shared

mos_host = import_sibling(__file__, "mos_host")
mos_host_binding = import_sibling(__file__, "mos_host_binding")
concept_folder = mos_host_binding.concept_folder

TAB_TITLE = "Mix-of-Show training"
KINDS = {"ED-LoRA (concept tokens)": "edlora", "LoRA (trigger words)": "lora"}
PRECISIONS = ("fp16", "bf16", "fp32")
GALLERY_LIMIT = 16  # preview samples kept for the gallery
DEFAULT_CLASS_WORD = "person"  # Mix-of-Show's main use is characters; the templates follow it
ATTN_REG_DEFAULT = 0.01  # the authors' weight (with masks); the trainer's own default stays 0 for the CLI
ATTN_REG_INFO = (
    "The authors' 0.01 keeps the tokens' attention on the subject of pictures with a mask (NAME_mask.png). "
    "A picture without a mask is fine: there it only keeps the attention inside the picture. 0: off.")


class TrainingStatus:
    """What a generation refused during training is told. (A plain class: the host runs script
    files as modules outside sys.modules, where `dataclass` cannot resolve string annotations.)"""

    def __init__(self, step: int, steps: int) -> None:
        self.step, self.steps = step, steps

    def __str__(self) -> str:
        return (f"Mix-of-Show training is running (step {self.step} of {self.steps}): a generation now would run on "
                "the model it is training; interrupt it in the Mix-of-Show training tab or wait")


RUNNING: TrainingStatus | None = None  # the run in progress, if any (the tab's module-level flag)


# ------------------------------------------------------------------------------------- inputs


def concept_path(name: str) -> Path:
    """`<Lora folder>/<name>.safetensors`; a name with folders, or none, is refused."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or name in (".", "..") or name.startswith(".") or re.search(r"[\\/:]", name) \
            or os.path.basename(name) != name:
        raise ValueError(f"concept name {name!r}: give a file name for the Lora folder, without folders or ':'")
    return Path(concept_folder()) / f"{name}.safetensors"


def default_tokens(name: str) -> str:
    """`<name1>+<name2>` from the concept name (the authors' two tokens per concept)."""
    stem = re.sub(r"[^\w-]", "", (name or "").strip().removesuffix(".safetensors")) or "concept"
    return f"<{stem}1>+<{stem}2>"


def parse_tokens(text: str) -> tuple[str, ...]:
    """`<a>+<b>` (as the fusion tab writes tokens) into ('<a>', '<b>')."""
    parts = [t.strip() for t in (text or "").split("+")]
    if not any(parts) or not all(re.fullmatch(r"<[^<>\s+]+>", t) for t in parts):
        raise ValueError(f"tokens {text!r}: write them as <a>+<b> (angle brackets, no spaces)")
    return tuple(parts)


def default_precision() -> str:
    """fp16 autocast on a GPU, fp32 elsewhere (CPU autocast in fp16 is slow or unsupported)."""
    return "fp16" if torch.device(devices.device).type == "cuda" else "fp32"


# ------------------------------------------------------------------------------- the live model


def live_config(unet, text_encoder) -> SD1Config:
    """The widths of the live model, read from its modules: ldm's UNetModel keeps its constructor's
    `model_channels` / `num_heads`, transformers' CLIPTextModel its `config`."""
    cfg = text_encoder.config
    _, attn2 = attn2_modules(unet, SD1)[0]
    if attn2.to_k.in_features != cfg.hidden_size:
        raise ValueError(f"the UNet's cross-attention reads {attn2.to_k.in_features} wide contexts, the text encoder "
                         f"writes {cfg.hidden_size}: not an SD1 model")
    return SD1Config(model_channels=int(unet.model_channels), unet_num_heads=int(unet.num_heads),
                     context_dim=int(cfg.hidden_size), text_layers=int(cfg.num_hidden_layers),
                     text_heads=int(cfg.num_attention_heads), text_intermediate=int(cfg.intermediate_size),
                     vocab_size=int(cfg.vocab_size), max_positions=int(cfg.max_position_embeddings))


def _check_trainable(sd_model) -> None:
    """What both families need: eps prediction, the whole model on the GPU."""
    if getattr(sd_model, "parameterization", "eps") != "eps":
        raise ValueError("the loaded checkpoint predicts v; Mix-of-Show trains eps-prediction models only")
    if getattr(sd_model, "lowvram", False):
        raise RuntimeError("training needs the whole model on the GPU: restart the WebUI without --lowvram / --medvram "
                           "(the WebUI's own embedding training refuses --lowvram too)")


def live_sd1_model(sd_model) -> SD1Model:
    """The loaded model's parts as the trainer takes them; anything but a plain SD1 model (eps
    prediction, text conditioning only) is refused, naming what it is."""
    if sd_model is None:
        raise RuntimeError("no model is loaded: choose a checkpoint at the top of the page")
    for flag, what in (("is_sd2", "an SD2"), ("is_sd3", "an SD3")):
        if getattr(sd_model, flag, False):
            raise ValueError(f"the loaded checkpoint is {what} model; Mix-of-Show trains SD1.x and SDXL models only: "
                             "load an SD1.5- or SDXL-based checkpoint")
    if getattr(sd_model.model, "conditioning_key", "crossattn") != "crossattn":
        raise ValueError("the loaded checkpoint is an inpainting or instruct-pix2pix model (its UNet takes extra input "
                         "channels); load a plain SD1.5-based checkpoint")
    _check_trainable(sd_model)
    unet = mos_host.unet_of(sd_model)
    text_encoder = sd_model.cond_stage_model.wrapped.transformer
    return SD1Model(unet=unet, text_encoder=text_encoder, tokenizer=sd_model.cond_stage_model.tokenizer,
                    alphas_cumprod=sd_model.alphas_cumprod, config=live_config(unet, text_encoder))


def live_sdxl_model(sd_model) -> SDXLModel:
    """The loaded SDXL model as the trainer takes it: the host's UNet and CLIP-L, and bigG as a
    transformers model over the host's OpenCLIP weights (the trainer calls transformers' encoders
    and names bigG's layers as kohya files do; OpenCLIP fuses q, k and v into one weight). Its
    parameters are views of the host's tensors (q, k, v: row blocks of `in_proj_weight`; the
    projection: the transpose), assigned, not copied: it costs no memory, and since the trainer
    never writes weights the host's stay bit-identical."""
    embedders = sd_model.conditioner.embedders
    unet, te1 = mos_host.unet_of(sd_model), embedders[0].wrapped.transformer
    openclip = embedders[1].wrapped.model
    # the host wraps the token embedding (EmbeddingsWithFixes), keeping the original as `wrapped`
    state = {k.replace("token_embedding.wrapped.", "token_embedding."): v for k, v in openclip.state_dict().items()}
    blocks, c1 = openclip.transformer.resblocks, te1.config
    projection = state["text_projection"].shape[1]
    config = SDXLConfig(
        model_channels=int(unet.model_channels), head_channels=int(unet.num_head_channels),
        te1_width=int(c1.hidden_size), te1_layers=int(c1.num_hidden_layers), te1_heads=int(c1.num_attention_heads),
        te1_intermediate=int(c1.intermediate_size), te2_width=int(state["token_embedding.weight"].shape[1]),
        te2_layers=len(blocks), te2_heads=int(blocks[0].attn.num_heads),
        te2_intermediate=int(blocks[0].mlp.c_fc.out_features),
        size_features=(int(unet.label_emb[0][0].in_features) - projection) // 6,
        vocab_size=int(state["token_embedding.weight"].shape[0]), max_positions=int(state["positional_embedding"].shape[0]))
    weight = state["token_embedding.weight"]
    with torch.random.fork_rng(devices=[]):
        te2 = sdxl.build_text_encoders(config, device="meta")[1].to(weight.dtype)
    views = sdxl.te2_from_openclip({k: v.detach() for k, v in state.items() if k != "logit_scale"})
    te2.load_state_dict(views, strict=False, assign=True)  # the host's tensors themselves: no copy
    te2.text_model.embeddings.register_buffer(
        "position_ids", torch.arange(config.max_positions, device=weight.device).expand(1, -1), persistent=False)
    return SDXLModel(unet=unet, text_root=torch.nn.ModuleList([te1, te2.eval().requires_grad_(False)]),
                     tokenizer=embedders[0].wrapped.tokenizer, alphas_cumprod=sd_model.alphas_cumprod, config=config)


def live_model(sd_model) -> SD1Model | SDXLModel:
    """The loaded model as the trainer takes it, by its family (`live_sd1_model`, `live_sdxl_model`)."""
    if sd_model is not None and getattr(sd_model, "is_sdxl", False):
        if getattr(sd_model, "is_sdxl_inpaint", False):
            raise ValueError("the loaded checkpoint is an SDXL inpainting model (its UNet takes extra input "
                             "channels); load a plain SDXL-based checkpoint")
        _check_trainable(sd_model)
        return live_sdxl_model(sd_model)
    return live_sd1_model(sd_model)


def _lora_networks():
    """The built-in Lora extension's `networks` module (the host imports it as a top-level module
    with the extension's folder on sys.path, so it stays in sys.modules), or None without it."""
    module = sys.modules.get("networks")
    if module is None or not hasattr(module, "loaded_networks") or not hasattr(module, "network_apply_weights"):
        return None
    return module


def base_weights(sd_model) -> str:
    """Take Lora networks a generation left in the weights out again, so training sees the
    checkpoint's own weights. The host's Lora changes weights lazily and keeps them until the set
    of loaded networks changes; emptying that set and bringing each changed layer to it with the
    host's own function restores the layer's backed-up weights. The next generation loads what its
    prompt names, as after any generation without `<lora:...>`. Returns a note for the status."""
    networks = _lora_networks()
    if networks is None:
        return ""
    names = [getattr(net, "name", "?") for net in networks.loaded_networks]
    networks.loaded_networks.clear()
    restored = 0
    with torch.no_grad():
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_apply_weights(module)
                restored += 1
    if not restored:
        return ""
    applied = ", ".join(html.escape(n) for n in names) or "from an earlier generation"
    return (f"Lora networks ({applied}) were taken out of the weights of {restored} layers before training, so it "
            "saw the checkpoint's own weights; the next generation applies the ones its prompt names.")


@contextlib.contextmanager
def generation_refused(sd_model, status: TrainingStatus) -> Iterator[None]:
    """While training, the model's UNet wrapper (`sd_model.model`, which every generation's sampler
    calls and the trainer does not) refuses with `status`; the status is also on the model for the
    Mix-of-Show scripts (`sd_model.mos_training`) and in `RUNNING`."""
    global RUNNING

    def refuse(module, args):
        raise RuntimeError(str(status))

    handle = sd_model.model.register_forward_pre_hook(refuse)
    sd_model.mos_training = status
    RUNNING = status
    try:
        yield
    finally:
        RUNNING = None
        with contextlib.suppress(AttributeError):
            del sd_model.mos_training
        handle.remove()


class HostVae:
    """The loaded model's VAE as the trainer's encoder and preview decoder, called as the host
    calls it (modules/sd_samplers_common.py, processing.py), and the host's "Move VAE and CLIP to
    RAM when training" (`unload_models_when_training`; the host moves only the VAE): off the GPU
    once every view is encoded, back for each preview, and on the GPU again at the end."""

    def __init__(self, sd_model) -> None:
        self.sd_model = sd_model
        self.unload = bool(shared.opts.unload_models_when_training)
        self.off = False
        self._parallel = shared.parallel_processing_allowed

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the scaled latent posterior, one image at a time as the host encodes. SDXL's
        first stage (sgm) gives a scaled sample instead of the posterior: it is the view's latent,
        with std 0 (the posterior is narrow: its std is about 1% of the latents' spread)."""
        model = self.sd_model
        scale = float(model.scale_factor)
        means, stds = [], []
        for one in pixels.split(1):
            posterior = model.encode_first_stage(one.to(devices.device, model.first_stage_model.dtype))
            if isinstance(posterior, torch.Tensor):  # sgm: already a scaled sample
                means.append(posterior.float())
                stds.append(torch.zeros_like(means[-1]))
                continue
            means.append(posterior.mean.float() * scale)
            stds.append(posterior.std.float() * scale)
        return torch.cat(means), torch.cat(stds)

    def views_encoded(self) -> None:
        """Called once the trainer has encoded every view (`on_encoded`)."""
        if self.unload and not self.off:
            shared.parallel_processing_allowed = False
            self.sd_model.first_stage_model.to(devices.cpu)
            self.off = True

    def decode(self, latents: torch.Tensor) -> list:
        """Scaled latents -> PIL images through the host's decoding (its VAE setting, NaN check)."""
        from PIL import Image

        vae = self.sd_model.first_stage_model
        if self.off:
            vae.to(devices.device)
        try:
            samples = processing.decode_latent_batch(self.sd_model, latents, target_device=devices.cpu,
                                                     check_for_nans=True)
        finally:
            if self.off:
                vae.to(devices.cpu)
        images = []
        for sample in samples:
            x = torch.clamp((sample.float() + 1.0) / 2.0, min=0.0, max=1.0)
            images.append(Image.fromarray((255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)))
        return images

    def restore(self) -> None:
        if self.off:
            self.sd_model.first_stage_model.to(devices.device)
            self.off = False
        shared.parallel_processing_allowed = self._parallel


def refresh_lists(path: Path) -> None:
    """Make the new file known at once: the host's Lora list (so `<lora:name>` and the Lora tab
    have it) and the concept library the regional script and the fusion tab read."""
    networks = _lora_networks()
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()
    mos_host_binding.LIBRARY.scan(concept_folder())


# ------------------------------------------------------------------------------------- the job


def _settings(kind_label, tokens, class_word, trigger, steps, batch_size, resolution, lr_embedding, lr_text,
              lr_unet, rank, seed, masked_loss, attn_reg_weight, templates, precision, gradient_checkpointing,
              save_every, sample_every, sample_prompt):
    from lib_mos.training.trainer import TrainSettings

    if kind_label not in KINDS:
        raise ValueError(f"kind {kind_label!r}: choose one of {', '.join(KINDS)}")
    kind = KINDS[kind_label]
    prompts = tuple(p.strip() for p in (sample_prompt or "").splitlines() if p.strip())
    return TrainSettings(
        tokens=parse_tokens(tokens) if kind == "edlora" else (), class_word=(class_word or "").strip() or None,
        kind=kind, trigger=((trigger or "").strip() or None) if kind == "lora" else None, rank=int(rank),
        lr_embedding=float(lr_embedding), lr_text=float(lr_text), lr_unet=float(lr_unet), steps=int(steps),
        batch_size=int(batch_size), resolution=int(resolution), seed=int(seed), masked_loss=bool(masked_loss),
        attn_reg_weight=float(attn_reg_weight or 0.0) if kind == "edlora" else 0.0,  # shown for ED-LoRA only
        templates=templates, precision=precision,
        gradient_checkpointing=bool(gradient_checkpointing), save_every=int(save_every or 0),
        sample_every=int(sample_every or 0) if prompts else 0, sample_prompts=prompts)


def run_training(id_task, folder, name, kind_label, tokens, class_word, trigger, steps, batch_size, resolution,
                 lr_embedding, lr_text, lr_unet, rank, seed, masked_loss, attn_reg_weight, templates, precision,
                 gradient_checkpointing, save_every, sample_every, sample_prompt, overwrite, resume):
    """The tab's job, under the host's queue lock (`wrap_gradio_gpu_call`, `id_task` from the page).
    Returns (gallery update, status HTML); errors propagate to the host's wrapper, which shows them."""
    from lib_mos.training.data import read_training_folder
    from lib_mos.training.trainer import TrainingInterrupted, train

    settings = _settings(kind_label, tokens, class_word, trigger, steps, batch_size, resolution, lr_embedding,
                         lr_text, lr_unet, rank, seed, masked_loss, attn_reg_weight, templates, precision,
                         gradient_checkpointing, save_every, sample_every, sample_prompt)
    out = concept_path(name)
    sd_model = shared.sd_model
    model = live_model(sd_model)
    folder = (folder or "").strip()
    if not folder:
        raise ValueError("images folder: give the folder with the training images")
    shared.state.job = TAB_TITLE
    shared.state.job_count = 1
    shared.state.sampling_steps = settings.steps
    shared.state.sampling_step = 0
    shared.state.textinfo = f"{TAB_TITLE}: reading {folder}"
    images = read_training_folder(folder, class_word=settings.class_word, placeholder=PLACEHOLDER)
    os.makedirs(out.parent, exist_ok=True)

    status = TrainingStatus(0, settings.steps)
    samples: list[tuple] = []
    last = {"loss": math.nan}
    vae = HostVae(sd_model)

    def progress(p) -> None:
        status.step, last["loss"] = p.step, p.loss
        shared.state.sampling_step = p.step
        norm = f", embedding norm {p.emb_norm:.3f}" if p.emb_norm is not None else ""
        shared.state.textinfo = (f"{TAB_TITLE}: step {p.step}/{p.steps}, loss {p.loss:.4f}{norm}, "
                                 f"{p.steps_per_s:.2f} steps/s")

    def should_stop() -> bool:
        return shared.state.interrupted or shared.state.skipped

    def on_samples(step: int, pictures: list) -> None:
        if pictures:
            shared.state.assign_current_image(pictures[0])
        samples.extend((img, f"step {step}: {prompt}") for img, prompt in zip(pictures, settings.sample_prompts))
        del samples[:-GALLERY_LIMIT]

    shared.state.textinfo = f"{TAB_TITLE}: encoding {len(images)} images"
    start = time.perf_counter()
    lora_note = ""
    try:
        with generation_refused(sd_model, status):
            lora_note = base_weights(sd_model)
            train(model, settings, images, out, encoder=vae.encode, decoder=vae.decode, name=out.stem,
                  resume=bool(resume), overwrite=bool(overwrite), progress=progress, should_stop=should_stop,
                  on_samples=on_samples, on_encoded=vae.views_encoded)
    except TrainingInterrupted as e:
        checkpoint = (f"the last checkpoint is <code>{html.escape(str(e.checkpoint))}</code> (tick Resume to continue "
                      "from it)" if e.checkpoint else "no checkpoint was written (set Save every N steps to keep one)")
        return gallery_update(samples), (f"<p>Interrupted at step {e.step} of {settings.steps}; {checkpoint}.</p>"
                                 + _note(lora_note))
    finally:
        vae.restore()
    refresh_lists(out)
    seconds = time.perf_counter() - start
    how = (f"tokens {html.escape(' '.join(settings.tokens))}" if settings.kind == "edlora"
           else f"trigger words {html.escape(str(settings.trigger))}")
    checkpoint = getattr(getattr(sd_model, "sd_checkpoint_info", None), "title", "the loaded model")
    return gallery_update(samples), (
        f"<p>Saved <code>{html.escape(str(out))}</code>: {settings.steps} steps on {html.escape(checkpoint)}, final "
        f"loss {last['loss']:.4f}, {seconds:.1f} s. Use it with {how}; it is in the Lora list, the regional script "
        "and the fusion tab now.</p>" + _note(lora_note))


def _note(text: str) -> str:
    return f"<p>{text}</p>" if text else ""


def gallery_update(samples: list[tuple]) -> dict:
    """The gallery shows only when there are preview samples: an empty one is a large blank box."""
    return gr.update(value=list(samples), visible=True) if samples else gr.update(value=None, visible=False)


def interrupt() -> None:
    """The host's Interrupt: the trainer stops before its next step."""
    shared.state.interrupt()


def interrupt_button(running: bool) -> dict:
    """Interrupt is enabled only while a run is going: while idle it would interrupt nothing (or
    another tab's generation, since the host's interrupt stops whatever job runs)."""
    return gr.update(interactive=running)


def tokens_for(name: str, kind_label: str):
    """The tokens box follows the concept name (ED-LoRA)."""
    return gr.update(value=default_tokens(name)) if KINDS.get(kind_label) == "edlora" else gr.update()


def kind_fields(kind_label: str) -> tuple[dict, dict, dict, dict]:
    """(tokens, trigger words, attention regulariser, embedding learning rate): only what the Kind
    uses is shown (a LoRA has no token rows to learn); the run ignores the hidden ones (`_settings`)."""
    edlora = KINDS.get(kind_label) == "edlora"
    return (gr.update(visible=edlora), gr.update(visible=not edlora), gr.update(visible=edlora),
            gr.update(visible=edlora))


def templates_for(class_word: str) -> dict:
    """The caption templates follow the class word (people: portraits; things and animals: object
    photos; a style word: style captions); a template picked by hand stays until the word changes."""
    return gr.update(value=training_plan.templates_for_class_word(class_word))


# ------------------------------------------------------------------------- device and estimate


def ram_bytes() -> int | None:
    """The machine's RAM (psutil, which the host requires; else POSIX sysconf), None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(device) -> int | None:
    """Total memory in bytes of a CUDA device, or the RAM for the CPU (whose proposal needs it for
    512 px); None elsewhere or when torch cannot tell."""
    device = torch.device(device)
    if device.type == "cpu":
        return ram_bytes()
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return int(torch.cuda.get_device_properties(device).total_memory)
    except (RuntimeError, AssertionError, ValueError):
        return None


def host_device() -> tuple[str, int | None, int]:
    """(device kind, its memory in bytes or None, CPU threads) of the host's `devices.device`."""
    device = torch.device(devices.device)
    return device.type, device_memory(device), torch.get_num_threads()


def device_words(kind: str, memory: int | None, threads: int) -> str:
    size = f", {memory / 2**30:.0f} GiB" if memory else ""
    if kind == "cpu":
        return f"this CPU ({threads} thread{'' if threads == 1 else 's'}{size and size + ' RAM'})"
    return f"this {'GPU' if kind == 'cuda' else kind.upper() + ' device'}{size}"


def loaded_family() -> str:
    """The loaded checkpoint's family name for the plan ("sdxl" or "sd1")."""
    return SDXL.name if getattr(shared.sd_model, "is_sdxl", False) else SD1.name


def proposal() -> training_plan.Plan:
    """Steps, batch and resolution for the host's device and the loaded model (read when the page
    is built)."""
    kind, memory, threads = host_device()
    return training_plan.propose(kind, memory, loaded_family(), threads=threads)


def estimate_html(steps, batch_size, resolution) -> str:
    """The estimated time of the steps on the host's device, with what the authors' recipe would
    take there when the proposal is smaller (on a CPU: days)."""
    kind, memory, threads = host_device()
    try:
        steps, batch_size, resolution = int(steps), int(batch_size), int(resolution)
        seconds = training_plan.estimate_seconds(steps, batch_size, resolution, kind, threads=threads,
                                                 family=loaded_family())
    except (TypeError, ValueError, OverflowError):
        return "<p>Estimated time: set the steps, batch size and resolution.</p>"
    basis = "from a measurement on a CPU" if kind == "cpu" else "assumed from published timings"
    text = (f"Estimated time: <b>{training_plan.format_duration(seconds)}</b> for {steps} steps of batch "
            f"{batch_size} at {resolution} px on {html.escape(device_words(kind, memory, threads))}, {basis}; the "
            "progress bar shows the real ETA once it runs (encoding the images and previews add a little).")
    authors = training_plan.AUTHORS
    if (steps, batch_size, resolution) != (authors.steps, authors.batch_size, authors.resolution):
        full = training_plan.estimate_seconds(authors.steps, authors.batch_size, authors.resolution, kind,
                                              threads=threads, family=loaded_family())
        text += (f" The authors' recipe ({authors.steps} steps, batch {authors.batch_size}, {authors.resolution} px) "
                 f"would take {training_plan.format_duration(full)} here.")
    return f"<p>{text}</p>"


def _not_saved(*components) -> None:
    """Keep these out of ui-config.json: the host writes every default there on first start and
    reads it back on the next, so a saved old default would override the device's proposal, and a
    saved Kind would open the page on fields built for the other Kind."""
    for component in components:
        component.do_not_save_to_config = True


def on_ui_tabs():
    if mos_host.TRAINING_MESSAGE:
        return mos_host.message_tab(TAB_TITLE, "mos_train", mos_host.TRAINING_MESSAGE)
    templates = tuple(TEMPLATES)
    plan = proposal()
    first_kind = next(iter(KINDS))
    edlora = KINDS[first_kind] == "edlora"
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("Train a Mix-of-Show concept on the loaded SD1.x model from a folder of images (captions from "
                    "`.txt` files beside them, optional subject masks). It is saved in the Lora folder and usable at "
                    "once in prompts, the regional script and the fusion tab.")
        with gr.Row():
            folder = gr.Textbox(label="Images folder", placeholder="/path/to/images", elem_id="mos_train_folder")
            name = gr.Textbox(label="Concept name (file in the Lora folder)", value="my-concept",
                              elem_id="mos_train_name")
        with gr.Row():
            kind = gr.Radio(label="Kind", choices=list(KINDS), value=first_kind, elem_id="mos_train_kind")
            tokens = gr.Textbox(label="Tokens (ED-LoRA)", value=default_tokens("my-concept"), visible=edlora,
                                elem_id="mos_train_tokens")
            trigger = gr.Textbox(label="Trigger words (LoRA)", value="", visible=not edlora,
                                 elem_id="mos_train_trigger")
            class_word = gr.Textbox(label="Class word (person, man, dog, ...)",
                                    value=DEFAULT_CLASS_WORD, elem_id="mos_train_class_word",
                                    info="Initialises the last token (ED-LoRA) and stands for the concept in "
                                         "captions; the caption templates follow it.")
        with gr.Row():
            steps = gr.Number(label="Steps", value=plan.steps, precision=0, elem_id="mos_train_steps")
            batch_size = gr.Slider(label="Batch size", minimum=1, maximum=16, step=1, value=plan.batch_size,
                                   elem_id="mos_train_batch_size")
            resolution = gr.Slider(label="Resolution", minimum=64, maximum=1024, step=64, value=plan.resolution,
                                   elem_id="mos_train_resolution")
        estimate = gr.HTML(estimate_html(plan.steps, plan.batch_size, plan.resolution), elem_id="mos_train_estimate")
        with gr.Accordion("Advanced", open=False, elem_id="mos_train_advanced"):
            with gr.Row():
                lr_embedding = gr.Number(label="Embedding learning rate", value=1e-3, visible=edlora,
                                         elem_id="mos_train_lr_embedding")
                lr_text = gr.Number(label="Text encoder LoRA learning rate", value=1e-5, elem_id="mos_train_lr_text")
                lr_unet = gr.Number(label="UNet LoRA learning rate", value=1e-4, elem_id="mos_train_lr_unet")
                rank = gr.Slider(label="LoRA rank", minimum=1, maximum=64, step=1, value=4, elem_id="mos_train_rank")
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="mos_train_seed")
            with gr.Row():
                masked_loss = gr.Checkbox(label="Masked loss (where an image has a mask)", value=True,
                                          elem_id="mos_train_masked_loss")
                attn_reg = gr.Number(label="Attention regulariser weight (ED-LoRA)", value=ATTN_REG_DEFAULT,
                                     info=ATTN_REG_INFO, visible=edlora, elem_id="mos_train_attn_reg")
                template = gr.Dropdown(label="Caption templates (follow the class word)", choices=list(templates),
                                       value=training_plan.templates_for_class_word(DEFAULT_CLASS_WORD),
                                       elem_id="mos_train_templates")
                precision = gr.Radio(label="Precision", choices=list(PRECISIONS), value=default_precision(),
                                     elem_id="mos_train_precision")
                checkpointing = gr.Checkbox(label="Gradient checkpointing (less memory, slower)",
                                            value=plan.gradient_checkpointing,
                                            elem_id="mos_train_gradient_checkpointing")
            with gr.Row():
                save_every = gr.Number(label="Save every N steps (0: at the end only)", value=0, precision=0,
                                       elem_id="mos_train_save_every")
                sample_every = gr.Number(label="Preview every N steps (0: never)", value=0, precision=0,
                                         elem_id="mos_train_sample_every")
                sample_prompt = gr.Textbox(label=f"Preview prompts, one a line ({PLACEHOLDER}: the tokens or trigger "
                                                 "words)", value=f"a photo of {PLACEHOLDER}", lines=1,
                                           elem_id="mos_train_sample_prompt")
        with gr.Row():
            overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="mos_train_overwrite")
            resume = gr.Checkbox(label="Resume from the last checkpoint", value=False, elem_id="mos_train_resume")
            run = gr.Button("Train", variant="primary", elem_id="mos_train_run")
            stop = gr.Button("Interrupt", interactive=False, elem_id="mos_train_interrupt")
        task_id = gr.Textbox(visible=False)  # the page puts the task id here (mosTrainSubmit), as in the fusion tab
        task_id.do_not_save_to_config = True  # a per-request value, never a default
        with gr.Group(elem_id="mos_train_results_panel"):
            gallery = gr.Gallery(label="Previews", show_label=False, columns=4, visible=False,
                                 elem_id="mos_train_gallery")
            status = gr.HTML("", elem_id="mos_train_status")
        _not_saved(kind, steps, batch_size, resolution, checkpointing)

        name.change(fn=tokens_for, inputs=[name, kind], outputs=[tokens])
        kind.change(fn=kind_fields, inputs=[kind], outputs=[tokens, trigger, attn_reg, lr_embedding], queue=False,
                    show_progress="hidden")
        class_word.change(fn=templates_for, inputs=[class_word], outputs=[template], queue=False,
                          show_progress="hidden")
        for field in (steps, batch_size, resolution):
            field.change(fn=estimate_html, inputs=[steps, batch_size, resolution], outputs=[estimate], queue=False,
                         show_progress="hidden")
        # Interrupt on, the job (the page's task id first: mosTrainSubmit), Interrupt off whatever the outcome
        job = run.click(fn=lambda: interrupt_button(True), inputs=[], outputs=[stop], queue=False,
                        show_progress="hidden")
        job = job.then(fn=call_queue.wrap_gradio_gpu_call(run_training, extra_outputs=[None]), _js="mosTrainSubmit",
                       inputs=[task_id, folder, name, kind, tokens, class_word, trigger, steps, batch_size,
                               resolution, lr_embedding, lr_text, lr_unet, rank, seed, masked_loss, attn_reg, template,
                               precision, checkpointing, save_every, sample_every, sample_prompt, overwrite, resume],
                       outputs=[gallery, status])
        job.then(fn=lambda: interrupt_button(False), inputs=[], outputs=[stop], queue=False, show_progress="hidden")
        stop.click(fn=interrupt, inputs=[], outputs=[])
    return [(tab, TAB_TITLE, "mos_train")]


script_callbacks.on_ui_tabs(on_ui_tabs)
