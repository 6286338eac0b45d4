"""Folder layout of the host. Tests point `data_path` at a temporary folder with `set_data_path`."""

import atexit
import os
import shutil
import tempfile

import modules.safe  # noqa: F401  # as in the host: torch.load is the pickle guard from here on

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_path = tempfile.mkdtemp(prefix="a1111-double-")
atexit.register(shutil.rmtree, data_path, ignore_errors=True)  # the default folder, not one a test set
models_path = os.path.join(data_path, "models")


def set_data_path(path: str) -> None:
    """Re-root the host's data folders (models/, embeddings/, outputs) and the `--ui-config-file`
    default (`<data dir>/ui-config.json`) under `path`."""
    global data_path, models_path
    data_path = path
    models_path = os.path.join(path, "models")
    from modules import shared

    shared.cmd_opts.data_dir = path
    shared.cmd_opts.embeddings_dir = os.path.join(path, "embeddings")
    shared.cmd_opts.lora_dir = os.path.join(models_path, "Lora")
    shared.cmd_opts.lyco_dir_backcompat = os.path.join(models_path, "LyCORIS")
    shared.cmd_opts.ckpt_dir = None
    shared.cmd_opts.ui_config_file = os.path.join(path, "ui-config.json")
    from modules import sd_models

    sd_models.model_path = os.path.join(models_path, "Stable-diffusion")
