"""Global state of the host: options, job state, command-line options and the loaded model."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import threading
import time
import types
from typing import Any

from modules import paths

log = logging.getLogger(__name__)

_DEFAULTS: dict[str, Any] = {
    # sampling / CFG batching (shared_options.py)
    "batch_cond_uncond": True,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "skip_early_cond": 0.0,
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    # prompts
    "CLIP_stop_at_last_layers": 1,
    "emphasis": "Original",
    "comma_padding_backtrack": 20,
    "persistent_cond_cache": True,
    "hires_fix_use_firstpass_conds": False,
    "textual_inversion_add_hashes_to_infotext": True,
    "use_old_scheduling": False,
    # SDXL (shared_options.py)
    "sdxl_clip_l_skip": False,
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    # checkpoints
    "sd_model_checkpoint": None,
    "sd_checkpoint_hash": "",
    "sd_checkpoints_limit": 1,
    "sd_checkpoints_keep_in_cpu": True,
    # img2img
    "img2img_fix_steps": False,
    "initial_noise_multiplier": 1.0,
    "img2img_extra_noise": 0.0,
    "img2img_color_correction": False,
    "img2img_background_color": "#ffffff",
    "sd_vae_encode_method": "Full",
    "upscaler_for_img2img": None,
    "save_init_img": False,
    "inpainting_mask_weight": 1.0,
    # extra networks
    "extra_networks_default_multiplier": 1.0,
    # output
    "samples_save": False,
    "enable_pnginfo": True,
    "live_preview_content": "Prompt",
    # progress (the page reads these from `settings_json`)
    "show_progress_in_title": True,
    "interrupt_after_current": True,
    "show_progressbar": True,
    "live_previews_enable": True,
    "live_previews_image_format": "png",
    "show_progress_grid": True,
    "show_progress_every_n_steps": 10,
    "live_preview_refresh_period": 1000,
    "prevent_screen_sleep_during_generation": True,
    # training (shared_options.py, "Training" section)
    "unload_models_when_training": False,
}


class Options:
    """Settings object: known keys read their value or default; unknown keys raise AttributeError."""

    def __init__(self) -> None:
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", dict(_DEFAULTS))

    def __getattr__(self, item: str) -> Any:
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        labels = object.__getattribute__(self, "data_labels")
        if item in labels:
            return labels[item]
        raise AttributeError(f"'Options' object has no attribute '{item}'")

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.data or key in self.data_labels:
            self.data[key] = value
            return
        object.__setattr__(self, key, value)

    def get_default(self, key: str) -> Any:
        return self.data_labels.get(key)

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        """As the host: an unchanged value is a no-op (False), an unknown name raises KeyError; the
        double has no onchange callbacks."""
        if self.data.get(key, None) == value:
            return False
        if key not in self.data_labels:
            raise KeyError(key)
        self.data[key] = value
        return True

    def add_option(self, key: str, info: Any) -> None:
        """Extensions add settings from on_ui_settings; the default goes into `data` unless a value is
        there already, as in the host (no settings UI changes it)."""
        self.data_labels[key] = getattr(info, "default", info)
        if key not in self.data:
            self.data[key] = self.data_labels[key]

    def reset(self) -> None:
        self.data.clear()

    def dumpjson(self) -> str:
        """What the page's `settings_json` holds (options.Options.dumpjson): every setting's value, or
        its default, and the comment and category tables, empty here (the double has no sections)."""
        d = {k: self.data.get(k, default) for k, default in self.data_labels.items()}
        d["_comments_before"] = {}
        d["_comments_after"] = {}
        d["_categories"] = [["Defaults", "Other"]]
        return json.dumps(d)


class OptionInfo:
    def __init__(self, default: Any = None, label: str = "", component: Any = None, component_args: Any = None,
                 onchange: Any = None, section: Any = None, **kwargs: Any) -> None:
        self.default = default
        self.label = label
        self.section = section

    def info(self, text: str) -> OptionInfo:
        return self

    def needs_reload_ui(self) -> OptionInfo:
        return self


class State:
    """Job progress and interrupt flags (modules/shared_state.py). `begin` sets what the host's sets
    (`time_start` among them) and leaves `sampling_steps` from the last job, as the host does; `end`
    before any `begin` fails on `time_start` as in the host. `reset` (double only) is a fresh process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.processing_has_refined_job_count = False
        self.job_timestamp = "0"
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo: str | None = None
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.time_start: float | None = None
        self.server_start = time.time()

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    def stop_generating(self) -> None:
        self.stopping_generation = True

    def set_current_image(self) -> None:
        """The host turns `current_latent` into a live preview here every few steps; the double's
        sampler stores no latents, so `current_image` stays None (as in the host before its first
        preview)."""

    def assign_current_image(self, image) -> None:
        """The live preview the progress API sends next (a new `id_live_preview`); jpeg previews
        cannot hold RGBA or palette images, so those are converted first."""
        if opts.live_previews_image_format == "jpeg" and image.mode in ("RGBA", "P"):
            image = image.convert("RGB")
        self.current_image = image
        self.id_live_preview += 1

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self) -> dict:
        return {k: getattr(self, k) for k in ("skipped", "interrupted", "stopping_generation", "job", "job_count",
                                              "job_timestamp", "job_no", "sampling_step", "sampling_steps")}

    def begin(self, job: str = "(unknown)") -> None:
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        log.info("Starting job %s", job)

    def end(self) -> None:
        log.info("Ending job %s (%.2f seconds)", self.job, time.time() - self.time_start)
        self.job = ""
        self.job_count = 0


class _TotalTqdm:
    def updateTotal(self, new_total: int) -> None:
        pass

    def update(self) -> None:
        pass

    def clear(self) -> None:
        pass


class _PromptStyles:
    def apply_styles_to_prompt(self, prompt: str, styles: list[str]) -> str:
        return prompt

    def apply_negative_styles_to_prompt(self, prompt: str, styles: list[str]) -> str:
        return prompt


opts = Options()
state = State()
cmd_opts = types.SimpleNamespace(
    data_dir=paths.data_path,
    ckpt_dir=None,
    embeddings_dir=os.path.join(paths.data_path, "embeddings"),
    lora_dir=os.path.join(paths.models_path, "Lora"),
    lyco_dir_backcompat=os.path.join(paths.models_path, "LyCORIS"),
    ui_config_file=os.path.join(paths.data_path, "ui-config.json"),
    no_prompt_history=True,
    no_hashing=False,
    hide_ui_dir_config=False,
    freeze_settings=False,
    api=False,
    skip_install=False,
    disable_safe_unpickle=False,
)
sd_model = None
parallel_processing_allowed = True  # False while lowvram or a training has the VAE off the GPU
demo = None
gradio_theme = None
device = None
total_tqdm = _TotalTqdm()
prompt_styles = _PromptStyles()
latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
}
sd_upscalers: list = []


def natural_sort_key(s, regex=re.compile("([0-9]+)")):
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def walk_files(path, allowed_extensions=None):
    """Files under `path` (links followed), folders and names in natural order (modules/util.py)."""
    if not os.path.exists(path):
        return
    allowed = set(allowed_extensions) if allowed_extensions is not None else None
    for root, _, files in sorted(os.walk(path, followlinks=True), key=lambda x: natural_sort_key(x[0])):
        for filename in sorted(files, key=natural_sort_key):
            if allowed is not None and os.path.splitext(filename)[1].lower() not in allowed:
                continue
            yield os.path.join(root, filename)
