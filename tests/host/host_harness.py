"""Starts the host double the way webui.py starts the real one, for tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from modules import (
    extra_networks,
    paths,
    processing,
    script_callbacks,
    scripts,
    sd_hijack_optimizations,
    sd_hijack_unet,
    sd_models,
    shared,
)
from modules.sd_hijack import model_hijack


class HostHarness:
    """Data folder under `root`, `checkpoint` copied into models/Stable-diffusion and loaded."""

    def __init__(self, root: Path, checkpoint: Path, extensions: list[str] | None = None) -> None:
        paths.set_data_path(str(root))
        os.makedirs(sd_models.model_path, exist_ok=True)
        os.makedirs(shared.cmd_opts.embeddings_dir, exist_ok=True)
        os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
        shutil.copy(checkpoint, os.path.join(sd_models.model_path, checkpoint.name))
        shared.opts.reset()
        shared.state.reset()
        script_callbacks.clear_callbacks()
        script_callbacks.reported_errors.clear()
        scripts.reported_errors.clear()
        extra_networks.activations.clear()
        self._clear_cond_caches()
        model_hijack.embedding_db.clear_embedding_dirs()
        model_hijack.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)
        if extensions:
            scripts.load_scripts(extensions)
        sd_models.list_models()
        self.model = sd_models.load_model()
        scripts.create_script_runners()
        self.scripts = scripts.scripts_txt2img
        self.blocks = self._build_ui()

    def _build_ui(self):
        """The host builds every script's UI at start; the inputs decide the script_args layout."""
        import gradio as gr

        with gr.Blocks() as blocks:
            self.scripts.setup_ui()
            self.ui_tabs = script_callbacks.ui_tabs_callback()
        return blocks

    def script_args(self, title: str | None = None, *values) -> list:
        """script_args as the UI submits them: every control at its default, `title` selected in the
        dropdown with its own controls set to `values` (as many as given)."""
        args = self.scripts.default_args()
        if title is not None:
            script = self.scripts.script(title)
            args[0] = self.scripts.selectable_scripts.index(script) + 1
            args[script.args_from:script.args_from + len(values)] = values
        return args

    @staticmethod
    def _clear_cond_caches() -> None:
        processing.StableDiffusionProcessing.cached_c = [None, None]
        processing.StableDiffusionProcessing.cached_uc = [None, None]
        processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
        processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]

    def txt2img(self, prompt: str = "", negative_prompt: str = "", **fields):
        from modules import txt2img

        fields.setdefault("width", 64)
        fields.setdefault("height", 64)
        fields.setdefault("steps", 3)
        fields.setdefault("seed", 1)
        fields.setdefault("sampler_name", "Euler")
        fields.setdefault("script_args", self.script_args())
        return txt2img.txt2img(prompt, negative_prompt, **fields)

    def close(self) -> None:
        script_callbacks.clear_callbacks()
        self._clear_cond_caches()
        shared.sd_model = None
        sd_hijack_optimizations.undo()
        sd_hijack_unet.undo()
