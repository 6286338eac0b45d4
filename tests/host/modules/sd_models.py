"""Checkpoints (modules/sd_models.py): listing, hashing, reading state dicts and loading the model.

The loaded model imitates ldm's LatentDiffusion as the host wraps it: `model.diffusion_model`
is the real ldm UNet, `cond_stage_model` the host's prompt encoder around a transformers
CLIPTextModel, and weights are loaded with `load_state_dict(strict=False)` as the host does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import safetensors
import safetensors.torch
import torch

from lib_mos import sd1
from lib_mos.clip_tokenizer import load_clip_tokenizer
from modules import paths, script_callbacks, shared
from modules.sd_hijack import model_hijack
from modules.sd_hijack_clip import FrozenCLIPEmbedder

model_dir = "Stable-diffusion"
model_path = os.path.join(paths.models_path, model_dir)
checkpoints_list: dict[str, CheckpointInfo] = {}
checkpoint_aliases: dict[str, CheckpointInfo] = {}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


class CheckpointInfo:
    def __init__(self, filename: str):
        self.filename = os.path.abspath(filename)
        root = shared.cmd_opts.ckpt_dir if shared.cmd_opts.ckpt_dir and self.filename.startswith(
            os.path.abspath(shared.cmd_opts.ckpt_dir)) else model_path
        name = os.path.relpath(self.filename, root) if self.filename.startswith(os.path.abspath(root)) \
            else os.path.basename(filename)
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra]
        self.metadata: dict = {}
        if filename.lower().endswith(".safetensors"):
            with contextlib.suppress(Exception), safetensors.safe_open(filename, "pt") as f:
                self.metadata = f.metadata() or {}

    def register(self) -> None:
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self

    def calculate_shorthash(self) -> str:
        self.sha256 = _sha256(self.filename)
        if self.shorthash == self.sha256[0:10]:
            return self.shorthash
        self.shorthash = self.sha256[0:10]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        self.ids += [self.sha256, self.shorthash, self.title, self.short_title]
        self.register()
        if old_title != self.title:
            checkpoints_list.pop(old_title, None)
        return self.shorthash


def list_models() -> None:
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for root, _, files in os.walk(folder):
            for fn in sorted(files):
                if os.path.splitext(fn)[1].lower() in (".ckpt", ".safetensors"):
                    CheckpointInfo(os.path.join(root, fn)).register()


def checkpoint_tiles(use_short: bool = False) -> list[str]:
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string: str):
    if not search_string:
        return None
    if search_string in checkpoint_aliases:
        return checkpoint_aliases[search_string]
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title], key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    if not checkpoints_list:
        raise FileNotFoundError(f"No checkpoints found in {model_path}")
    return next(iter(checkpoints_list.values()))


def read_state_dict(checkpoint_file: str, print_global_state: bool = False, map_location=None) -> dict:
    if os.path.splitext(checkpoint_file)[1].lower() == ".safetensors":
        sd = safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    else:
        # the host unpickles through its restricted unpickler (modules/safe.py)
        sd = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    if "state_dict" in sd:
        sd = sd["state_dict"]
    return sd


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = "crossattn"

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class LatentDiffusion(torch.nn.Module):
    """The slice of ldm's LatentDiffusion the host and extensions touch."""

    is_sd1, is_sd2, is_sdxl, is_ssd, is_sd3 = True, False, False, False, False
    cond_stage_key = "txt"
    parameterization = "eps"
    latent_channels = 4

    def __init__(self, config: sd1.SD1Config):
        super().__init__()
        self.model = DiffusionWrapper(sd1.build_unet(config))
        self.cond_stage_model = FrozenCLIPEmbedder(sd1.build_text_encoder(config), load_clip_tokenizer())
        self.register_buffer("alphas_cumprod", sd1.sd1_alphas_cumprod())
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

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        yield


def _config_for(info: CheckpointInfo) -> sd1.SD1Config:
    """The host picks a model config yaml from the state dict; SD1 files get v1-inference (SD1.5
    widths). Files written by lib_mos for the tiny test model carry their widths in metadata."""
    text = info.metadata.get(sd1.CONFIG_METADATA_KEY)
    return sd1.SD1Config.from_json(text) if text else sd1.SD15


def load_model(checkpoint_info: CheckpointInfo | None = None, already_loaded_state_dict=None):
    info = checkpoint_info or select_checkpoint()
    state_dict = already_loaded_state_dict or read_state_dict(info.filename)
    if any(k.startswith("conditioner.") for k in state_dict):
        raise RuntimeError(f"{info.filename}: SDXL checkpoints are not supported by the test double")
    model = LatentDiffusion(_config_for(info))
    model.load_state_dict(state_dict, strict=False)
    model.eval().requires_grad_(False)
    model.sd_model_hash = info.calculate_shorthash()
    model.sd_checkpoint_info = info
    model.sd_model_checkpoint = info.filename
    shared.opts.data["sd_model_checkpoint"] = info.title
    shared.opts.data["sd_checkpoint_hash"] = info.sha256
    model_hijack.hijack(model)
    shared.sd_model = model
    with torch.no_grad():
        model.cond_stage_model_empty_prompt = model.cond_stage_model([""])
    model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    script_callbacks.model_loaded_callback(model)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    info = info or select_checkpoint()
    current = shared.sd_model
    if current is not None and not forced_reload and current.sd_checkpoint_info.filename == info.filename:
        return current
    return load_model(info)


def unload_model_weights(sd_model=None, info=None):
    shared.sd_model = None


