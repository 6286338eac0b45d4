"""The host's pickle guard (modules/safe.py), installed over `torch.load` when `modules.paths` is
imported, i.e. before anything else of the host runs, and for the rest of the process.

What matters to extensions, reproduced from the v1.10.1 source:
- `torch.load(f, ...)` first *checks* `f`: it opens it with `zipfile.ZipFile(f)` (for a file object
  that moves its position and never moves it back), refuses any zip entry outside
  `<dir>/data.pkl`, `<dir>/version`, `<dir>/byteorder`, `<dir>/data/<n>`, `<dir>/.data/serialization_id`
  (recent torch also writes `.format_version` and `.storage_alignment`, so its files are refused),
  and unpickles `data.pkl` with an allow-list of globals. A non-zip file is re-opened *by name*
  and checked as five legacy pickles (a file object there is a TypeError, hence refused).
- On any failure it prints a report and returns None; it never raises.
- Otherwise it calls the original `torch.load` with the same arguments, on the same (moved) file
  object.
`torch.serialization.load` is left alone, as in the host.
"""

from __future__ import annotations

import collections
import pickle
import re
import sys
import traceback
import zipfile

import numpy
import torch

_ALLOWED_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
_TORCH_STORAGES = {"FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
                   "float32", "BFloat16Storage"}

reports: list[str] = []
"""Every refusal's message, for tests (the host prints them through errors.report)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals the host allows; storages become empty placeholders."""

    extra_handler = None

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if self.extra_handler is not None:
            found = self.extra_handler(module, name)
            if found is not None:
                return found
        allowed = {
            ("collections", "OrderedDict"): lambda: collections.OrderedDict,
            ("torch.nn.modules.container", "ParameterDict"): lambda: torch.nn.modules.container.ParameterDict,
            ("_codecs", "encode"): lambda: __import__("_codecs").encode,
            ("__builtin__", "set"): lambda: set,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]()
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter",
                                                 "_rebuild_device_tensor_from_numpy"):
            return getattr(torch._utils, name)
        if module == "torch" and name in _TORCH_STORAGES:
            return getattr(torch, name)
        if module == "numpy.core.multiarray" and name in ("scalar", "_reconstruct"):
            return getattr(numpy.core.multiarray, name)
        if module == "numpy" and name in ("dtype", "ndarray"):
            return getattr(numpy, name)
        raise Exception(f"global '{module}/{name}' is forbidden")


def check_pt(filename, extra_handler) -> None:
    try:
        with zipfile.ZipFile(filename) as z:
            for entry in z.namelist():
                if not _ALLOWED_ENTRY.match(entry):
                    raise Exception(f"bad file inside {filename}: {entry}")
            pickles = [f for f in z.namelist() if _DATA_PKL.match(f)]
            if len(pickles) != 1:
                raise Exception(f"{'data.pkl not found' if not pickles else 'Multiple data.pkl found'} in {filename}")
            with z.open(pickles[0]) as file:
                unpickler = RestrictedUnpickler(file)
                unpickler.extra_handler = extra_handler
                unpickler.load()
    except zipfile.BadZipfile:
        with open(filename, "rb") as file:  # by name: a file object is a TypeError here, as in the host
            unpickler = RestrictedUnpickler(file)
            unpickler.extra_handler = extra_handler
            for _ in range(5):
                unpickler.load()


def _report(message: str) -> None:
    reports.append(message)
    print(message, file=sys.stderr)
    traceback.print_exc(file=sys.stderr)


def load(filename, *args, **kwargs):
    return load_with_extra(filename, *args, extra_handler=global_extra_handler, **kwargs)


def load_with_extra(filename, extra_handler=None, *args, **kwargs):
    from modules import shared

    try:
        if not getattr(shared.cmd_opts, "disable_safe_unpickle", False):
            check_pt(filename, extra_handler)
    except pickle.UnpicklingError:
        _report(f"Error verifying pickled file from {filename}\n-----> !!!! The file is most likely corrupted !!!! <-----")
        return None
    except Exception:
        _report(f"Error verifying pickled file from {filename}\nThe file may be malicious, so the program is not "
                "going to read it.")
        return None
    return unsafe_torch_load(filename, *args, **kwargs)


global_extra_handler = None
unsafe_torch_load = torch.serialization.load  # what `torch.load` is before the host replaces it
torch.load = load
