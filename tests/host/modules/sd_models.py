"""Checkpoints (modules/sd_models.py): listing, hashing, reading state dicts and loading the model.

The loaded model imitates ldm's LatentDiffusion as the host wraps it: `model.diffusion_model`
is the real ldm UNet, `cond_stage_model` the host's prompt encoder around a transformers
CLIPTextModel, `first_stage_model` a stand-in for ldm's AutoencoderKL (see `FirstStageModel`), and
weights are loaded with `load_state_dict(strict=False)` as the host does.

The UNet is built with `use_checkpoint=False`, as the host builds SD1 (configs/v1-inference.yaml
says False, and `repair_config` forces False for every UNet: "Do not use checkpoint for
inference"), so ldm's blocks carry `checkpoint` / `use_checkpoint` False.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import traceback

import safetensors.torch
import torch

from lib_mos.models import sd1
from lib_mos.models.clip_tokenizer import load_clip_tokenizer
from modules import hashes, paths, script_callbacks, shared
from modules.sd_hijack import model_hijack
from modules.sd_hijack_clip import FrozenCLIPEmbedder

model_dir = "Stable-diffusion"
model_path = os.path.join(paths.models_path, model_dir)
checkpoints_list: dict[str, CheckpointInfo] = {}
checkpoint_aliases: dict[str, CheckpointInfo] = {}


def model_hash(filename: str) -> str:
    """The host's old 8-hex hash: sha256 of 64 KiB from offset 1 MiB."""
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def replace_key(d: dict, key, new_key, value) -> dict:
    """Rename `key` to `new_key` keeping its position (the host's helper for checkpoint titles)."""
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    keys[keys.index(key)] = new_key
    new_d = {k: d[k] for k in keys}
    d.clear()
    d.update(new_d)
    return d


def read_metadata_from_safetensors(filename: str) -> dict:
    """The `__metadata__` of a safetensors header; values that look like JSON objects are parsed."""
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        header = json.loads(json_start + file.read(metadata_len - 2))
    res = {}
    for k, v in header.get("__metadata__", {}).items():
        res[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            with contextlib.suppress(Exception):
                res[k] = json.loads(v)
    return res


class CheckpointInfo:
    def __init__(self, filename: str):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        if name.startswith(("\\", "/")):
            name = name[1:]
        self.metadata: dict = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
            except Exception:
                traceback.print_exc()
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self) -> None:
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self

    def calculate_shorthash(self):
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        shorthash = self.sha256[0:10]
        if self.shorthash == shorthash:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()
        return self.shorthash


def list_models() -> None:
    """`--ckpt-dir` first, then models/Stable-diffusion, natural order, `.vae.*` files left out."""
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    places = []
    ckpt_dir = shared.cmd_opts.ckpt_dir
    if ckpt_dir is not None and ckpt_dir != model_path and os.path.exists(ckpt_dir):
        places.append(ckpt_dir)
    places.append(model_path)
    found: list[str] = []
    for place in places:
        for path in shared.walk_files(place, allowed_extensions=[".ckpt", ".safetensors"]):
            if path.endswith((".vae.ckpt", ".vae.safetensors")) or path in found:
                continue
            found.append(path)
    for path in found:
        CheckpointInfo(path).register()


def checkpoint_tiles(use_short: bool = False) -> list[str]:
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string: str):
    if not search_string:
        return None
    if search_string in checkpoint_aliases:
        return checkpoint_aliases[search_string]
    for text in (search_string, re.sub(re_strip_checksum, "", search_string)):
        found = sorted([info for info in checkpoints_list.values() if text in info.title], key=lambda x: len(x.title))
        if found:
            return found[0]
    return None


def select_checkpoint():
    model_checkpoint = shared.opts.sd_model_checkpoint
    info = checkpoint_aliases.get(model_checkpoint)
    if info is not None:
        return info
    if not checkpoints_list:
        raise FileNotFoundError(f"No checkpoints found in {model_path}")
    info = next(iter(checkpoints_list.values()))
    if model_checkpoint is not None:
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {info.title}", file=sys.stderr)
    return info


checkpoint_dict_replacements_sd1 = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


def transform_checkpoint_dict_key(k, replacements):
    for text, replacement in replacements.items():
        if k.startswith(text):
            k = replacement + k[len(text):]
    return k


def get_state_dict_from_checkpoint(pl_sd):
    """The `state_dict` entry when there is one; old text-encoder key names renamed (SD1)."""
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)
    sd = {}
    for k, v in pl_sd.items():
        new_key = transform_checkpoint_dict_key(k, checkpoint_dict_replacements_sd1)
        if new_key is not None:
            sd[new_key] = v
    pl_sd.clear()
    pl_sd.update(sd)
    return pl_sd


def read_state_dict(checkpoint_file: str, print_global_state: bool = False, map_location=None) -> dict:
    """safetensors, or `torch.load` as the host calls it (through its pickle guard, modules/safe.py,
    which answers None for a file it refuses: that fails here as in the host)."""
    if os.path.splitext(checkpoint_file)[1].lower() == ".safetensors":
        pl_sd = safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    else:
        pl_sd = torch.load(checkpoint_file, map_location=map_location or "cpu")
    return get_state_dict_from_checkpoint(pl_sd)


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class FirstStageModel(torch.nn.Module):
    """ldm's AutoencoderKL as the host calls it: `encode(x)` (x in [-1, 1]) gives ldm's own
    DiagonalGaussianDistribution of the *unscaled* latent, `decode(z)` an image in [-1, 1] from an
    unscaled latent, `dtype` (a Lightning module's property). The double has no VAE weights: its
    decoder is the linear latent->RGB map the double decodes images with
    (`processing.decode_latent_batch`, `lib_mos.models.sampling.LATENT_RGB`) applied to `z * scale_factor`,
    each latent cell an 8x8 block; its encoder is that map's least-squares inverse of each 8x8
    block's mean colour, with a fixed small posterior std (`STD`)."""

    STD = 0.01  # of the unscaled latent; the real VAE's posterior is this narrow

    def __init__(self, scale_factor: float):
        from lib_mos.models.sampling import LATENT_RGB

        super().__init__()
        to_rgb = LATENT_RGB * scale_factor  # [4, 3]: unscaled latent -> RGB
        self.register_buffer("to_rgb", to_rgb, persistent=False)
        self.register_buffer("from_rgb", torch.linalg.pinv(to_rgb), persistent=False)  # [3, 4]

    @property
    def dtype(self) -> torch.dtype:
        return self.to_rgb.dtype

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        pooled = torch.nn.functional.avg_pool2d(x.to(self.dtype), 8)
        mean = torch.einsum("brhw,rc->bchw", pooled, self.from_rgb)
        logvar = torch.full_like(mean, 2 * math.log(self.STD))
        return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))

    def decode(self, z):
        rgb = torch.einsum("bchw,cr->brhw", z.to(self.dtype), self.to_rgb)
        return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")


class LatentDiffusion(torch.nn.Module):
    """The slice of ldm's LatentDiffusion the host and extensions touch. The first-stage methods
    are ldm's (models/diffusion/ddpm.py): `encode_first_stage` and `decode_first_stage` without
    gradients, `decode_first_stage` dividing by `scale_factor` (0.18215, v1-inference.yaml's; a
    plain float, as ldm keeps it when `scale_by_std` is off), `get_first_stage_encoding` sampling
    the posterior with the global RNG and scaling."""

    is_sd1, is_sd2, is_sdxl, is_ssd, is_sd3 = True, False, False, False, False
    is_sdxl_inpaint = False
    lowvram = False
    cond_stage_key = "txt"
    parameterization = "eps"
    latent_channels = 4

    def __init__(self, config: sd1.SD1Config):
        super().__init__()
        self.model = DiffusionWrapper(sd1.build_unet(config))
        self.cond_stage_model = FrozenCLIPEmbedder(sd1.build_text_encoder(config), load_clip_tokenizer())
        self.register_buffer("alphas_cumprod", sd1.sd1_alphas_cumprod())
        self.scale_factor = 0.18215
        self.first_stage_model = FirstStageModel(self.scale_factor).eval().requires_grad_(False)
        self.sd_checkpoint_info = None
        self.sd_model_hash = None
        self.sd_model_checkpoint = None
        self.cond_stage_model_empty_prompt = None

    def get_learned_conditioning(self, c):
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        if predict_cids:
            raise NotImplementedError("the test double has no VQ first stage (predict_cids)")
        z = 1. / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        yield


SDXL_SCALE_FACTOR = 0.13025  # sd_xl_base.yaml


class SdxlFirstStageModel(FirstStageModel):
    """sgm's AutoencoderKLInferenceWrapper (sd_xl_base.yaml's first stage): `encode(x)` is a sample of
    the posterior, a tensor, not the distribution ldm's AutoencoderKL returns."""

    def encode(self, x):
        return super().encode(x).sample()


def build_sdxl_model(config):
    """sd_xl_base.yaml as the double builds it: sgm's DiffusionEngine with the UNet (lib_mos's
    ldm build at `config`'s widths, its attention modules given sgm's classes), a GeneralConditioner
    of FrozenCLIPEmbedder (layer "hidden", layer_idx = its penultimate layer), FrozenOpenCLIPEmbedder2
    (layer "penultimate", pooled, legacy False) and three ConcatTimestepEmbedderND (original size,
    crop corner, target size; `config.size_features` per number: 256 in SDXL base), and the
    first-stage stand-in at SDXL's scale factor."""
    from sgm.models.diffusion import DiffusionEngine
    from sgm.modules import GeneralConditioner
    from sgm.modules.attention import convert_ldm_attention
    from sgm.modules.encoders import modules as encoders
    from transformers import CLIPTextModel

    from lib_mos.models import sdxl
    from modules import sd_models_xl  # noqa: F401  (the host imports it with sd_models: class patches)

    with torch.random.fork_rng(devices=[]):
        unet = convert_ldm_attention(sdxl.build_unet(config))
        te1 = CLIPTextModel(sdxl.build_text_encoders(config, device="meta")[0].config)
        tower = encoders.OpenCLIPTextTower(config.te2_width, config.te2_layers, config.te2_heads,
                                           config.te2_intermediate, config.te2_width, config.vocab_size,
                                           config.max_positions)
    tokenizer = load_clip_tokenizer()
    sizes = [{"target": encoders.ConcatTimestepEmbedderND, "params": {"outdim": config.size_features},
              "input_key": key} for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    conditioner = GeneralConditioner([
        {"target": encoders.FrozenCLIPEmbedder, "input_key": "txt",
         "params": {"transformer": te1, "tokenizer": tokenizer, "layer": "hidden", "layer_idx": config.te1_layers - 1}},
        {"target": encoders.FrozenOpenCLIPEmbedder2, "input_key": "txt",
         "params": {"model": tower, "tokenizer": encoders.OpenCLIPTokenizer(tokenizer), "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
        *sizes,
    ])
    model = DiffusionEngine(unet, conditioner, SdxlFirstStageModel(SDXL_SCALE_FACTOR).eval().requires_grad_(False),
                            scale_factor=SDXL_SCALE_FACTOR)
    model.lowvram = False
    model.sd_checkpoint_info = None
    model.sd_model_hash = None
    model.sd_model_checkpoint = None
    model.cond_stage_model_empty_prompt = None
    return model


SDXL_CLIP_WEIGHT = "conditioner.embedders.1.model.ln_final.weight"
SDXL_REFINER_CLIP_WEIGHT = "conditioner.embedders.0.model.ln_final.weight"


def _config_for(info: CheckpointInfo, state_dict: dict):
    """The host picks a model config yaml from the state dict: `conditioner.embedders.1.model.
    ln_final.weight` means SDXL (sd_xl_base.yaml), else SD1 files get v1-inference (SD1.5 widths).
    Files written by lib_mos for the tiny test models carry their widths in metadata."""
    if state_dict.get(SDXL_CLIP_WEIGHT) is not None:
        if state_dict["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9:
            raise RuntimeError(f"{info.filename}: the test double has no SDXL inpainting model")
        from lib_mos.models import sdxl

        value = info.metadata.get(sdxl.CONFIG_METADATA_KEY)
        if isinstance(value, dict):
            value = json.dumps(value)
        return sdxl.SDXLConfig(**json.loads(value)) if value else sdxl.SDXL_BASE
    if any(k.startswith("conditioner.") for k in state_dict):
        raise RuntimeError(f"{info.filename}: the test double runs SD1 and SDXL base only (not the refiner, SSD, "
                           "SD2 turbo)")
    value = info.metadata.get(sd1.CONFIG_METADATA_KEY)
    if isinstance(value, dict):  # the host's metadata reader parses values that look like JSON
        value = json.dumps(value)
    return sd1.SD1Config.from_json(value) if value else sd1.SD15


class SkipWritingToConfig:
    """Inside it, loading weights does not write the checkpoint's title to the settings."""

    skip = False
    previous = None

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


def send_model_to_trash(m) -> None:
    """As the host: a model that is replaced goes to the meta device, so references kept to it break."""
    m.to(device="meta")


def get_empty_cond(sd_model):
    """The host computes it with every extra network deactivated (which unloads any active Lora)."""
    from modules import extra_networks, processing

    p = processing.StableDiffusionProcessingTxt2Img()
    extra_networks.activate(p, {})
    d = sd_model.get_learned_conditioning([""])
    return d["crossattn"] if isinstance(d, dict) else d  # SDXL: the crossattn of [""]


def set_model_type(model, state_dict) -> None:
    model.is_sd1 = model.is_sd2 = model.is_sdxl = model.is_ssd = model.is_sd3 = False
    if hasattr(model, "conditioner"):
        model.is_sdxl = True
        if "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" not in state_dict:
            raise RuntimeError("the test double has no SSD-1B")
    else:
        model.is_sd1 = True
    if not hasattr(model, "latent_channels"):
        model.latent_channels = 4


def load_model_weights(model, checkpoint_info: CheckpointInfo, state_dict, timer=None) -> None:
    sd_model_hash = checkpoint_info.calculate_shorthash()
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    if state_dict is None:
        state_dict = read_state_dict(checkpoint_info.filename)
    set_model_type(model, state_dict)
    if model.is_sdxl:
        from modules import sd_models_xl

        sd_models_xl.extend_sdxl(model)
    model.load_state_dict(state_dict, strict=False)
    model.is_sdxl_inpaint = False
    model.sd_model_hash = sd_model_hash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256


def load_model(checkpoint_info: CheckpointInfo | None = None, already_loaded_state_dict=None):
    """A new model object: the previous one is trashed, the new one hijacked, embeddings reloaded,
    `model_loaded` callbacks fired, then the empty-prompt cond computed (in the host's order)."""
    info = checkpoint_info or select_checkpoint()
    if shared.sd_model is not None:
        send_model_to_trash(shared.sd_model)
        shared.sd_model = None
    state_dict = already_loaded_state_dict if already_loaded_state_dict is not None else read_state_dict(info.filename)
    config = _config_for(info, state_dict)
    model = LatentDiffusion(config) if isinstance(config, sd1.SD1Config) else build_sdxl_model(config)
    model.used_config = config
    load_model_weights(model, info, state_dict)
    model.eval().requires_grad_(False)
    model_hijack.hijack(model)
    shared.sd_model = model
    model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    script_callbacks.model_loaded_callback(model)
    with torch.no_grad():
        model.cond_stage_model_empty_prompt = get_empty_cond(model)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """The host's path with `sd_checkpoints_limit` 1: nothing when that file is loaded already; else
    the loaded model object takes the new weights in place (`load_state_dict`, hijack again,
    `model_loaded` callbacks; no embedding reload, the empty-prompt cond kept), unless the new file
    needs another config, which builds a new model (`load_model`)."""
    if shared.opts.sd_checkpoints_limit != 1:
        raise NotImplementedError("the test double keeps one checkpoint loaded (sd_checkpoints_limit 1)")
    checkpoint_info = info or select_checkpoint()
    sd_model = sd_model or shared.sd_model
    if sd_model is None:
        return load_model(checkpoint_info)
    current_checkpoint_info = sd_model.sd_checkpoint_info
    if sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model

    model_hijack.undo_hijack(sd_model)
    state_dict = read_state_dict(checkpoint_info.filename)
    if _config_for(checkpoint_info, state_dict) != sd_model.used_config:
        send_model_to_trash(sd_model)
        return load_model(checkpoint_info, already_loaded_state_dict=state_dict)
    try:
        load_model_weights(sd_model, checkpoint_info, state_dict)
    except Exception:
        load_model_weights(sd_model, current_checkpoint_info, None)
        raise
    finally:
        model_hijack.hijack(sd_model)
        script_callbacks.model_loaded_callback(sd_model)
    shared.sd_model = sd_model
    return sd_model


def unload_model_weights(sd_model=None, info=None):
    """The host only moves the model to the CPU, where the double's already is."""
    return sd_model
