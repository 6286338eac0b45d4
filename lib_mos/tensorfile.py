""".safetensors files read and written one tensor at a time with plain file IO.

`safetensors.safe_open` memory-maps the file: every page a read touches counts in the process's
resident memory until the handle closes, so loading a checkpoint into an allocated model peaks at
the model plus the whole file. `safetensors.torch.save_file` builds a byte copy of every tensor
before writing. A fusion or training process that must stay under a memory budget (SDXL is 6.9 GB
in fp16) cannot afford either, so this module reads each tensor straight into its destination's
buffer and writes each tensor's bytes as it comes: the peak is the model plus one tensor.

The format: an 8-byte little-endian header length, a JSON header (`__metadata__`: str -> str, and
per tensor its dtype, shape and [begin, end) byte offsets from the start of the data), the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = ["Entry", "TensorFile", "write_entries", "write_tensor"]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # newer dtypes: only where this torch has them
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit: a bigger "header" is a file of another kind
_CHUNK = 64 * 2**20  # bytes per read/write call: bounded buffers, and under Linux's 2 GB per call

if sys.byteorder != "little":  # pragma: no cover - every platform the host runs on is little-endian
    raise ImportError("lib_mos.tensorfile reads and writes tensor bytes as they are in memory: little-endian only")


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (numpy has no bf16/fp8: go via uint8)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


class TensorFile:
    """A .safetensors file opened for reading tensor by tensor (no mmap); a context manager.

    Errors are FileNotFoundError or ValueError, naming the file (and the key)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._file: BinaryIO = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise ValueError(f"{self.path}: not a readable .safetensors file: it is a folder") from None
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _bad(self, why: str) -> ValueError:
        return ValueError(f"{self.path}: not a readable .safetensors file: {why}")

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._bad(f"{size} bytes, too short for a header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _HEADER_LIMIT):
            raise self._bad(f"header length {length} does not fit the file's {size} bytes")
        raw = self._file.read(length)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._bad(f"the header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._bad("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._bad("__metadata__ is not a map of strings")
        self.metadata: dict[str, str] = dict(metadata)
        self._data_start = 8 + length
        data_size = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"key {key!r} has no valid dtype/shape/data_offsets: {info!r}") from None
            if not isinstance(name, str) or name not in _DTYPES:
                raise ValueError(f"{self.path}: key {key!r} has dtype {name!r}, which this torch cannot hold")
            dtype = _DTYPES[name]
            if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
                raise self._bad(f"key {key!r} has a bad shape {list(shape)} or data_offsets {[begin, end]}")
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
                raise ValueError(f"{self.path}: key {key!r} has data_offsets [{begin}, {end}]: "
                                 f"{end - begin} bytes for {nbytes} ({name} {list(shape)})")
            if end > data_size:
                raise ValueError(f"{self.path}: truncated: key {key!r} ends at data byte {end}, "
                                 f"the file has {data_size}")
            self._entries[key] = (dtype, shape, begin, end)

    # ------------------------------------------------------------------------------- context manager
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------- header
    def keys(self) -> list[str]:
        """Tensor names in the header's order."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise ValueError(f"{self.path}: no key {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[0]

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entry(key)
        return end - begin

    # ---------------------------------------------------------------------------------------- data
    def _readinto(self, key: str, buffer: memoryview) -> None:
        """Fill `buffer` (exactly the tensor's bytes) from the file, in bounded calls."""
        _, _, begin, end = self._entry(key)
        self._file.seek(self._data_start + begin)
        done, total = 0, end - begin
        while done < total:
            n = self._file.readinto(buffer[done:min(total, done + _CHUNK)])
            if not n:
                raise ValueError(f"{self.path}: truncated: key {key!r} ends after {done} of its {total} bytes")
            done += n

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key` on the CPU (read into a fresh buffer, then cast to `dtype` if given)."""
        stored, shape, _, _ = self._entry(key)
        raw = torch.empty(self.nbytes(key), dtype=torch.uint8)
        self._readinto(key, _byte_view(raw))
        tensor = raw.view(stored).reshape(shape)
        return tensor if dtype is None or dtype == stored else tensor.to(dtype)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy tensor `key` into `out` (a parameter or buffer of its shape, any dtype and device):
        straight into its memory when it is a contiguous CPU tensor of the stored dtype, else
        through one temporary of the stored tensor."""
        stored, shape, _, _ = self._entry(key)
        if tuple(out.shape) != shape:
            raise ValueError(f"{self.path}: key {key!r} has shape {list(shape)}, expected {list(out.shape)}")
        if out.device.type == "cpu" and out.dtype == stored and out.is_contiguous():
            self._readinto(key, _byte_view(out))
            return
        with torch.no_grad():
            out.copy_(self.read(key))

    def copy_raw(self, key: str, dst: BinaryIO) -> int:
        """Copy the stored bytes of `key` to `dst` in bounded chunks (a tensor a writer passes
        through unchanged); returns the number of bytes."""
        total = self.nbytes(key)
        buffer = memoryview(bytearray(min(total, _CHUNK)))
        self._file.seek(self._data_start + self._entry(key)[2])
        done = 0
        while done < total:
            n = self._file.readinto(buffer[:min(total - done, len(buffer))])
            if not n:
                raise ValueError(f"{self.path}: truncated: key {key!r} ends after {done} of its {total} bytes")
            dst.write(buffer[:n])
            done += n
        return total


# ------------------------------------------------------------------------------------------ writing
# A source is a tensor (cast to the entry's dtype on the CPU when its turn comes) or a callable
# that writes exactly the entry's bytes to the open file (`lambda f: tf.copy_raw(key, f)`).
Source = torch.Tensor | Callable[[BinaryIO], object]
Entry = tuple[str, torch.dtype, Sequence[int], Source]


def write_tensor(dst: BinaryIO, tensor: torch.Tensor) -> int:
    """Write the bytes of `tensor` (as stored: no cast) to `dst` in bounded chunks; returns the count."""
    tensor = tensor.detach().to("cpu").contiguous()
    view = _byte_view(tensor)
    for start in range(0, len(view), _CHUNK):
        dst.write(view[start:start + _CHUNK])
    return len(view)


def _check_entries(path: Path, entries: Sequence[Entry]) -> None:
    """Reject what would write a broken file, before any byte is written."""
    seen: set[str] = set()
    for key, dtype, shape, source in entries:
        if not isinstance(key, str) or key == "__metadata__":
            raise ValueError(f"cannot save {path}: bad tensor name {key!r}")
        if key in seen:
            raise ValueError(f"cannot save {path}: tensor {key!r} is listed twice")
        seen.add(key)
        if dtype not in _NAMES:
            raise ValueError(f"cannot save {path}: tensor {key!r} has dtype {dtype}, which .safetensors cannot hold")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"cannot save {path}: tensor {key!r} has a bad shape {list(shape)}")
        if isinstance(source, torch.Tensor):
            if source.device.type == "meta":
                raise ValueError(f"cannot save {path}: tensor {key!r} is on the meta device (no data)")
            if tuple(source.shape) != tuple(shape):
                raise ValueError(f"cannot save {path}: tensor {key!r} is {list(source.shape)}, "
                                 f"its entry says {list(shape)}")
        elif not callable(source):
            raise TypeError(f"cannot save {path}: the source of {key!r} is neither a tensor nor a callable")


def write_entries(fh: BinaryIO, path: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None,
                  ) -> None:
    """Write a whole .safetensors file to the open `fh` from `entries` `(key, dtype, shape,
    source)` one tensor at a time: the header is computed from the entries, then each source writes
    its bytes (a ValueError naming `path` and the key when a source writes the wrong count). Making
    it appear atomically under `path` is `files.write_safetensors_streaming`'s part."""
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    _check_entries(path, entries)
    # widest dtypes first, as safetensors orders them: with no gaps allowed between tensors, this
    # keeps every tensor aligned to its element size for readers that map the file
    ordered = sorted(entries, key=lambda e: -e[1].itemsize)
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for key, dtype, shape, _ in ordered:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for key, dtype, shape, source in ordered:
        start = fh.tell()
        if isinstance(source, torch.Tensor):
            write_tensor(fh, source.detach().to("cpu", dtype))
        else:
            source(fh)
        written, want = fh.tell() - start, math.prod(shape) * dtype.itemsize
        if written != want:
            raise ValueError(f"cannot save {path}: the source of {key!r} wrote {written} bytes, "
                             f"expected {want} ({_NAMES[dtype]} {list(shape)})")
