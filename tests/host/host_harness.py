"""Starts the host double the way webui.py starts the real one, for tests."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from modules import (
    errors,
    extra_networks,
    paths,
    processing,
    progress,
    script_callbacks,
    scripts,
    sd_hijack_optimizations,
    sd_hijack_unet,
    sd_models,
    shared,
)
from modules.sd_hijack import model_hijack

BUILTIN_EXTENSIONS = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "extensions-builtin", "Lora")]
"""The host's built-in extensions the double has (only Lora), loaded before any other extension."""
FORGE_DOUBLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "host_forge")
"""Forge's packages (tests/host_forge): on sys.path for a `HostHarness(forge=True)`."""


def _forget_forge_and_script_modules() -> None:
    """Forge's double packages and the extension's cached script modules (each holds the host layer
    it was loaded with) are imported afresh by the next harness, as in a fresh process."""
    for name in [k for k in sys.modules if k.startswith("_mix_of_show_scripts.")
                 or k.split(".")[0] in ("backend", "modules_forge", "forge_mode")]:
        del sys.modules[name]


class HostHarness:
    """Data folder under `root`, `checkpoint` copied into models/Stable-diffusion and loaded.
    `ui_config_file` is the host's `--ui-config-file` (default `<root>/ui-config.json`): the page's
    component defaults are read from it and new ones written back as the host does."""

    def __init__(self, root: Path, checkpoint: Path, extensions: list[str] | None = None,
                 ui_config_file: Path | str | None = None, forge: bool = False) -> None:
        """`forge`: the Forge double (tests/host_forge/forge_mode.py) instead of A1111's."""
        self.forge = None
        if forge:
            sys.path.insert(0, FORGE_DOUBLE)
            _forget_forge_and_script_modules()
        paths.set_data_path(str(root))
        if ui_config_file is not None:
            shared.cmd_opts.ui_config_file = str(ui_config_file)
        os.makedirs(sd_models.model_path, exist_ok=True)
        os.makedirs(shared.cmd_opts.embeddings_dir, exist_ok=True)
        os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
        _link_or_copy(checkpoint, Path(sd_models.model_path) / checkpoint.name)
        shared.opts.reset()
        shared.state.reset()
        progress.reset()
        script_callbacks.script_unloaded_callback()  # a harness left open: its patches undone first
        script_callbacks.clear_callbacks()
        script_callbacks.reported_errors.clear()
        scripts.reported_errors.clear()
        errors.reported.clear()
        extra_networks.activations.clear()
        self._clear_cond_caches()
        model_hijack.embedding_db.clear_embedding_dirs()
        model_hijack.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)
        shared.sd_model = None
        self.extensions = [os.path.abspath(e) for e in extensions or []]
        self._forget_builtin_modules()
        # as webui.py: scripts (built-in extensions first), checkpoints, the model, extra networks,
        # before_ui callbacks, then the page with each tab's script runner
        scripts.load_scripts([*BUILTIN_EXTENSIONS, *self.extensions])
        sd_models.list_models()
        self.model = sd_models.load_model()
        if forge:
            from forge_mode import ForgeMode

            self.forge = ForgeMode(self.model)
        extra_networks.initialize()
        extra_networks.register_default_extra_networks()
        script_callbacks.before_ui_callback()
        scripts.create_script_runners()
        self.scripts = scripts.scripts_txt2img
        self.url: str | None = None
        self.blocks = self._build_ui()

    @staticmethod
    def _forget_builtin_modules() -> None:
        """The built-in extensions' own modules (`networks`, `network_lora`, ...) are imported afresh
        for each harness, as in a fresh WebUI process."""
        roots = tuple(os.path.join(d, "") for d in BUILTIN_EXTENSIONS)
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(roots):
                del sys.modules[name]

    def _build_ui(self):
        """The host builds the whole page, every script's UI included, at start; the scripts' inputs
        decide the script_args layout."""
        from modules import ui

        blocks = ui.create_ui()
        shared.demo = blocks
        self.ui_tabs = list(ui.extension_tabs)
        return blocks

    def serve(self) -> str:
        """Serve the page as webui.py does (javascript and css injected, queue on, CORS middleware
        removed, the progress API added, `app_started` fired) on a free local port; returns its URL."""
        import socket

        from modules import ui_gradio_extensions

        ui_gradio_extensions.reload_javascript()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.blocks.queue(64)
        app, url, _ = self.blocks.launch(
            server_name="127.0.0.1", server_port=port, quiet=True, prevent_thread_lock=True,
            allowed_paths=[*self.extensions, paths.script_path],
        )
        # gradio 3.41's queue websocket handler only ends once the server has closed the socket, so
        # a browser that leaves while an event runs leaves it waiting for ever and uvicorn's
        # shutdown with it; stop after a bounded wait instead (see also `wait_idle`)
        self.blocks.server.config.timeout_graceful_shutdown = 3
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ != "CORSMiddleware"]
        progress.setup_progress_api(app)  # /internal/progress and /internal/pending-tasks
        script_callbacks.app_started_callback(self.blocks, app)
        self.url = url
        return url

    def wait_idle(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """Wait until the served page's queue has had no event waiting or running for `quiet`
        seconds (events the page fires by itself, like a `change` after a paste, included)."""
        import time

        queue = self.blocks._queue
        deadline = time.monotonic() + timeout
        idle_since = None
        while time.monotonic() < deadline:
            if queue.event_queue or any(queue.active_jobs):
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= quiet:
                return
            time.sleep(0.02)
        raise TimeoutError(f"the page's queue is still busy after {timeout} s")

    def script_args(self, title: str | None = None, *values, is_img2img: bool = False) -> list:
        """script_args as the UI submits them: every control at its default, `title` selected in the
        dropdown with its own controls set to `values` (as many as given); txt2img's layout, or
        img2img's with `is_img2img`."""
        runner = scripts.scripts_img2img if is_img2img else self.scripts
        args = runner.default_args()
        if title is not None:
            script = runner.script(title)
            args[0] = runner.selectable_scripts.index(script) + 1
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

    def img2img(self, prompt: str = "", negative_prompt: str = "", init_img=None, **fields):
        """Plain img2img of `init_img` (a PIL image; by default a 64x64 mid-grey) with the double's
        defaults as `txt2img`; `is_api=True` takes the API's path (`init_images`)."""
        from PIL import Image

        from modules import img2img

        if init_img is None and fields.get("init_images") is None:
            init_img = Image.new("RGB", (64, 64), (128, 128, 128))
        if fields.get("is_api"):
            fields.setdefault("init_images", [init_img])
        else:
            fields["init_img"] = init_img
        fields.setdefault("width", 64)
        fields.setdefault("height", 64)
        fields.setdefault("steps", 4)
        fields.setdefault("seed", 1)
        fields.setdefault("sampler_name", "Euler")
        fields.setdefault("script_args", self.script_args(is_img2img=True))
        return img2img.img2img(prompt, negative_prompt, **fields)

    def close(self) -> None:
        if self.url is not None:
            from modules import ui_gradio_extensions

            self.blocks.close(verbose=False)
            ui_gradio_extensions.undo()
            self.url = None
        shared.demo = None
        script_callbacks.script_unloaded_callback()  # the built-in Lora's class patches undone
        script_callbacks.clear_callbacks()
        self._clear_cond_caches()
        shared.sd_model = None
        sd_hijack_optimizations.undo()
        sd_hijack_unet.undo()
        if self.forge is not None:
            self.forge.remove()
            self.forge = None
            sys.path.remove(FORGE_DOUBLE)
            _forget_forge_and_script_modules()


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one: the tiny SDXL checkpoint is 110 MB, and a copy
    per test filled /tmp (pytest keeps three runs). Writers replace files atomically (a new inode),
    so no test can change the shared original through the link."""
    target.unlink(missing_ok=True)  # a second harness on the same folder: as a copy would, replace it
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)
