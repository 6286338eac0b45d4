"""A running WebUI process for the real-host suite (AUTOMATIC1111 v1.10.1, or Forge with
`RealForge`): start it on a data folder with default flags, call its API, run the CLIs with its
Python, stop it."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "sd-webui-mix-of-show"
FLAGS = ("--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
         "--use-cpu", "all", "--no-half", "--precision", "full", "--api", "--server-name", "127.0.0.1",
         "--no-download-sd-model")
CHECKPOINT = "sd15-random.safetensors"


def user_env() -> dict[str, str]:
    """This environment as a user's shell would have it: no test venv (PYTHONPATH, VIRTUAL_ENV) and
    not the one-thread torch the test suite sets for its own workers (tests/conftest.py), which
    would make the host's fusion child and the CLIs several times slower than a user's."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV"}
    if os.environ.get("MOS_TESTS_SET_OMP_NUM_THREADS"):
        drop |= {"OMP_NUM_THREADS", "MOS_TESTS_SET_OMP_NUM_THREADS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


class HostError(RuntimeError):
    """An API call answered with an HTTP error; `status` and `body` (the host's JSON) kept."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:2000]}")
        self.status, self.body = status, body


class RealHost:
    """One running WebUI process and its data folder."""

    flags = FLAGS
    ready_line: str | None = "Model loaded in"  # A1111 loads the checkpoint before it serves

    def __init__(self, webui: Path, data: Path) -> None:
        self.webui, self.data = webui, data
        self.python = Path(os.environ.get("MOS_WEBUI_PYTHON") or webui / "venv" / "bin" / "python")
        self.log = data / "host.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    # -------------------------------------------------------------------------------- layout
    @property
    def extension(self) -> Path:
        return self.data / "extensions" / EXTENSION_NAME

    @property
    def checkpoints(self) -> Path:
        return self.data / "models" / "Stable-diffusion"

    @property
    def loras(self) -> Path:
        return self.data / "models" / "Lora"

    @property
    def embeddings(self) -> Path:
        """The textual-inversion folder (`--embeddings-dir`'s default)."""
        return self.data / "embeddings"

    def prepare(self, checkpoint: Path, name: str = CHECKPOINT) -> None:
        for folder in (self.checkpoints, self.loras, self.extension.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.extension.symlink_to(ROOT, target_is_directory=True)
        target = self.checkpoints / name
        try:
            os.link(checkpoint, target)
        except OSError:
            shutil.copy(checkpoint, target)
        # The live preview of an SDXL generation ("Approx NN") downloads vaeapprox-sdxl.pt on first
        # use, which an offline machine cannot; the SD1 approximator has the same layout (4 latent
        # channels in, RGB out), so it stands in, in this data folder only.
        approx = self.webui / "models" / "VAE-approx" / "model.pt"
        sdxl_approx = self.data / "models" / "VAE-approx" / "vaeapprox-sdxl.pt"
        if approx.is_file() and not sdxl_approx.exists():
            sdxl_approx.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(approx, sdxl_approx)

    # ----------------------------------------------------------------------------- process
    def start(self, timeout: float = 600) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = user_env() | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("MOS_CACHE_DIR", None)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(self.python), "launch.py", *self.flags, "--port", str(port),
                                             "--data-dir", str(self.data)], cwd=self.webui, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the WebUI exited with {self.process.returncode} while starting:\n{self.tail()}")
            if self.ready_line is None or self.ready_line in self.log_text():
                try:
                    self.get("/sdapi/v1/sd-models")
                    return
                except (OSError, HostError):
                    pass
            time.sleep(2)
        raise TimeoutError(f"the WebUI was not ready after {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def rss_bytes(self) -> int:
        """The WebUI's resident memory (launch.py runs the WebUI in its own process, not a child)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --------------------------------------------------------------------------------- API
    def request(self, method: str, path: str, payload: dict | None = None, timeout: float = 1800) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                body = res.read().decode()
        except urllib.error.HTTPError as e:
            raise HostError(e.code, e.read().decode(errors="replace")) from None
        return json.loads(body) if body else {}

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def post(self, path: str, payload: dict | None = None) -> dict:
        return self.request("POST", path, payload or {})

    def txt2img(self, prompt: str, **fields) -> dict:
        body = dict(prompt=prompt, negative_prompt="", steps=2, width=128, height=128, seed=1, sampler_name="Euler",
                    cfg_scale=7.0, batch_size=1)
        body.update(fields)
        return self.post("/sdapi/v1/txt2img", body)

    def run_python(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        """`<webui python> <args>` in the extension's folder, as a user would run the CLIs: no
        PYTHONPATH, the WebUI's own packages."""
        return subprocess.run([str(self.python), *args], cwd=self.extension, env=user_env(), capture_output=True,
                              text=True, timeout=timeout)


class RealForge(RealHost):
    """Forge (lllyasviel's, f2) started as a CPU user starts it: `--always-cpu` is its one CPU flag
    (A1111's `--use-cpu`, `--no-half` and `--precision` are accepted and ignored by its backend). It
    loads the checkpoint at the first generation, so it is ready once the API answers."""

    ready_line = None

    @property
    def flags(self) -> tuple[str, ...]:
        """Forge's gradio 4 serves page files only from allowed paths, by default the data folder:
        with `--data-dir` elsewhere, Forge's own javascript/ must be allowed too (403 otherwise)."""
        return ("--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
                "--always-cpu", "--api", "--server-name", "127.0.0.1", "--no-download-sd-model",
                "--gradio-allowed-path", str(self.webui))


class RealForgeClassic(RealHost):
    """Haoming02's Forge Classic started as a CPU user starts it: `--always-cpu` (everything in
    float32). It loads the checkpoint at start, as A1111 does. Its gradio 3 refuses to serve files
    under a folder whose name starts with a dot, so data folders must not have one in their path."""

    flags = ("--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
             "--always-cpu", "--api", "--server-name", "127.0.0.1", "--no-download-sd-model")

    @property
    def embeddings(self) -> Path:
        """Forge Classic's `--embeddings-dir` defaults to models/embeddings (A1111: embeddings/)."""
        return self.data / "models" / "embeddings"


def images(result: dict) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in result["images"]]


def pixels(result: dict, index: int = 0):
    """The result's image `index` as an int array [H, W, 3] (RGB), safe to subtract."""
    import numpy as np

    return np.asarray(images(result)[index].convert("RGB")).astype(int)


def encode_png(array) -> str:
    """An image array [H, W, 3] (any int dtype, values 0-255) as base64 PNG, as the API takes images."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def infotexts(result: dict) -> list[str]:
    return json.loads(result["info"])["infotexts"]
