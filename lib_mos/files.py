"""Crash-safe file writing shared by everything that saves models, and loading one of the
extension's `scripts/*.py` files from another.

A checkpoint that is half written (power loss, Ctrl-C, a full disk) looks like a valid file to the
host's model list and fails only when somebody selects it, so every write goes to a temporary file
in the target folder first and is renamed into place only once it is complete and on disk.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["atomic_save_safetensors", "import_sibling"]


def _fsync_dir(folder: Path) -> None:
    """Persist a rename on POSIX; directories cannot be opened this way on Windows, so skip there."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_files_of(path: Path, pid: int) -> list[Path]:
    """The temporary files process `pid` has open (or left, if killed) for writing `path`."""
    return list(path.parent.glob(f".{path.name}.{pid}.*.tmp"))


def _create_temp(folder: Path, name: str) -> Path:
    """Create an empty hidden temp file next to the target with umask-governed permissions.

    tempfile.mkstemp would give mode 0600, and the renamed checkpoint would then be unreadable
    for a WebUI running as another user.
    """
    for _ in range(100):
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file in {folder}")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temp file to `path`; without `overwrite` never clobber a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # A hard link fails atomically when the target exists, closing the check-then-rename race.
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing file: {path}") from None
    except OSError:
        # Filesystem without hard links (FAT, some network mounts): best-effort check, then rename.
        if path.exists():
            raise FileExistsError(f"refusing to overwrite existing file: {path}") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` as a .safetensors file that either appears complete or not at all.

    Raises FileExistsError (naming the path) when the file exists and `overwrite` is False; the
    temporary file is removed on every failure, including KeyboardInterrupt.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing file: {path}")
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    prepared: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {path}: tensor {key!r} is on the meta device (no data)")
        prepared[key] = tensor.detach().contiguous()

    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(folder, path.name)
    try:
        save_file(prepared, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _publish(tmp, path, overwrite)
        _fsync_dir(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def import_sibling(anchor: str, name: str):
    """The module `<folder of anchor>/<name>.py`, executed once per process and file version.

    The WebUI imports each `scripts/*.py` as a top-level module that is not in `sys.modules` and
    puts the extension folder on `sys.path` only while the file imports, so one script file cannot
    `import` another. Loading by path (cached here under a private name) gives every caller the
    same module object, so module-level caches are shared."""
    path = os.path.join(os.path.dirname(os.path.abspath(anchor)), f"{name}.py")
    key = f"_mix_of_show_scripts.{name}"
    stamp = os.stat(path).st_mtime_ns
    module = sys.modules.get(key)
    if module is None or getattr(module, "_mos_stamp", None) != stamp:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
        module._mos_stamp = stamp
    return module
