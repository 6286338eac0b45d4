"""Fusion in a child process: `python -m lib_mos fuse ... --progress jsonl`, watched from the parent.

The WebUI's tab runs fusion this way so that the WebUI's own memory goes back to where it was
(a fusion loads a second copy of the model and streams statistics; freed tensors are not returned
to the system while the process lives), and so that a crash of the fusion (out of memory, a bug)
cannot take the WebUI down. The child reports progress, notes (which trigger words each LoRA
without tokens uses) and its result as JSON lines on stdout; an error is one `error: ...` line on
stderr and a non-zero exit code.

The parent turns all of that into callbacks and one exception with one clear message, stops the
child when asked (terminate, then kill), and removes what a killed child may leave behind: the
output is written atomically through a temporary file named after the child's pid
(`lib_mos.files`), so nothing half-written is ever visible under the output name.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lib_mos.files import temp_files_of

__all__ = ["FusionProcessError", "FusionProcessInterrupted", "run_fusion_process"]

Progress = Callable[[str, int, int], None]
_STOP_GRACE = 10.0  # seconds between terminate and kill


class FusionProcessError(RuntimeError):
    """The child failed; the message is what the user should read."""


class FusionProcessInterrupted(FusionProcessError):
    """Stopped on request; nothing was written."""


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _remove_leftovers(out: Path, pid: int) -> None:
    """The temporary files a killed child of this pid may have left next to `out`."""
    for tmp in temp_files_of(out, pid):
        tmp.unlink(missing_ok=True)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_fusion_process(fuse_args: Sequence[str], out: str | os.PathLike[str], *, progress: Progress | None = None,
                       should_stop: Callable[[], bool] | None = None, python: str | None = None,
                       cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
                       poll: float = 0.2) -> dict:
    """Run `python -m lib_mos fuse <fuse_args> --out <out> --progress jsonl` and return its result
    (the JSON object it prints last: path, report, warnings, seconds) with the notes it printed
    before it started ("notes": one line per trigger-word concept).

    `cwd` must be a folder from which `lib_mos` imports (the extension's folder); `env` defaults to
    this process's environment with PYTHONPATH set to this process's `sys.path`, so the child finds
    the same packages (inside the WebUI: its `ldm`)."""
    out = Path(out)
    if env is None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(cwd or ""), *sys.path] if p)
    cmd = [python or sys.executable, "-m", "lib_mos", "fuse", *fuse_args, "--out", str(out), "--progress", "jsonl"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    lines: queue.Queue = queue.Queue()
    errors: list[str] = []
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    err_thread = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    err_thread.start()
    result: dict | None = None
    notes: list[str] = []
    stopped: float | None = None  # when the stop was asked for
    try:
        while True:
            if stopped is None and should_stop is not None and should_stop():
                stopped = time.monotonic()
                proc.terminate()
            try:
                line = lines.get(timeout=poll)
            except queue.Empty:
                if stopped is not None and proc.poll() is None and time.monotonic() - stopped > _STOP_GRACE:
                    proc.kill()
                continue
            if line is None:
                break
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # a stray print of a library; not ours
            if "progress" in message and progress is not None:
                p = message["progress"]
                progress(str(p["what"]), int(p["done"]), int(p["total"]))
            elif "note" in message:
                notes.append(str(message["note"]))
            elif "result" in message:
                result = message["result"]
        code = proc.wait()
        err_thread.join(timeout=5)
    except BaseException:
        proc.kill()
        proc.wait()
        _remove_leftovers(out, proc.pid)
        raise
    if stopped is not None and result is None:  # (a child that finished first has written its file)
        _remove_leftovers(out, proc.pid)
        raise FusionProcessInterrupted("interrupted: nothing was written")
    if code != 0 or result is None:
        _remove_leftovers(out, proc.pid)
        said = [ln.strip() for ln in errors if ln.strip().startswith("error:")]
        if said:
            raise FusionProcessError(said[-1].removeprefix("error:").strip())
        if code < 0:
            raise FusionProcessError(f"the fusion process was killed ({_signal_name(code)}; out of memory?); "
                                     "nothing was written")
        tail = " ".join(ln.strip() for ln in errors[-3:])
        raise FusionProcessError(f"the fusion process failed (exit code {code}): {tail or 'no message'}; "
                                 "nothing was written")
    return {**result, "notes": notes}

