"""Crash-safe file writing shared by everything that saves models, and loading one of the
extension's `scripts/*.py` files from another.

A checkpoint that is half written (power loss, Ctrl-C, a full disk) looks like a valid file to the
host's model list and fails only when somebody selects it, so every write goes to a temporary file
in the target folder first and is renamed into place only once it is complete and on disk.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lib_mos.tensorfile import Entry, write_entries

__all__ = ["atomic_save_safetensors", "import_sibling", "write_safetensors_streaming"]


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


def write_safetensors_streaming(path: str | os.PathLike[str], entries: Sequence[Entry], *,
                                metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write a .safetensors file from `entries` `(key, dtype, shape, source)` one tensor at a time
    (`tensorfile.write_entries`). The file appears complete or not at all (a temp file next to it,
    fsynced, then renamed; removed on any error, including a source writing the wrong number of
    bytes). FileExistsError when `path` exists and not `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing file: {path}")
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(folder, path.name)
    try:
        with open(tmp, "wb") as fh:
            write_entries(fh, path, entries, metadata)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path, overwrite)
        _fsync_dir(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` as a .safetensors file that either appears complete or not at all, one
    tensor at a time (`write_safetensors_streaming`: no byte copy of the whole dict).

    Raises FileExistsError (naming the path) when the file exists and `overwrite` is False, and
    RuntimeError when two tensors share memory (as safetensors does: the file would hold the data
    twice and load as two tensors); the temporary file is removed on every failure, including
    KeyboardInterrupt.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing file: {path}")
    prepared: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {path}: tensor {key!r} is on the meta device (no data)")
        prepared[key] = tensor.detach().contiguous()
    _refuse_shared(prepared)
    entries = [(key, t.dtype, tuple(t.shape), t) for key, t in prepared.items()]
    return write_safetensors_streaming(path, entries, metadata=metadata, overwrite=overwrite)


def _refuse_shared(tensors: Mapping[str, torch.Tensor]) -> None:
    """RuntimeError naming two (contiguous) tensors whose bytes overlap, as safetensors refuses
    them; disjoint views of one storage (rows of one table) are fine: each is written once."""
    areas: dict[tuple[torch.device, int], list[tuple[int, int, str]]] = {}
    for key, tensor in tensors.items():
        if tensor.numel():
            start = tensor.data_ptr()
            areas.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(
                (start, start + tensor.numel() * tensor.element_size(), key))
    for group in areas.values():
        group.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(group):
            if start < end:
                raise RuntimeError(f"tensors {first!r} and {second!r} share memory; save a .clone() of one of them")


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
