"""Gradio call wrappers (modules/call_queue.py): one job at a time under the queue lock (a FIFO lock,
modules/fifo_lock.py: waiting jobs run in the order they asked), job state begun and ended around it,
flags reset afterwards, an exception turned into an error HTML output (the host does not re-raise it).

`wrap_gradio_gpu_call` takes a first argument that is exactly a `str` starting with `task(` and ending
with `)` as the job's task id: queued in `progress.pending_tasks` before the lock, made the current
task under it, its result recorded, finished in `finally`. `state.end()` is not in that `finally`: a
job that raises leaves `state.job` to `wrap_gradio_call`'s reset, as in the host."""

from __future__ import annotations

import collections
import html
import threading
import time
import traceback
from functools import wraps

from modules import progress, shared


class FIFOLock:
    """A lock that wakes its waiters in the order they came (modules/fifo_lock.py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads: collections.deque = collections.deque()

    def acquire(self, blocking: bool = True) -> bool:
        with self._inner_lock:
            if self._lock.acquire(False):
                return True
            if not blocking:
                return False
            wake = threading.Event()
            self._pending_threads.append(wake)
        wake.wait()
        return self._lock.acquire()

    def release(self) -> None:
        with self._inner_lock:
            if self._pending_threads:
                self._pending_threads.popleft().set()
            self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb) -> None:
        self.release()


queue_lock = FIFOLock()
reported_errors: list[str] = []


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        if args and type(args[0]) is str and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None

        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, **kwargs):
        try:
            res = func(*args, **kwargs)
        finally:
            shared.state.skipped = False
            shared.state.interrupted = False
            shared.state.stopping_generation = False
            shared.state.job_count = 0
            shared.state.job = ""
        return res

    return wrap_gradio_call_no_job(f, extra_outputs, add_stats)


def wrap_gradio_call_no_job(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        t = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            reported_errors.append(traceback.format_exc())
            if extra_outputs_array is None:
                extra_outputs_array = [None, ""]
            res = [*extra_outputs_array, f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]
        if not add_stats:
            return tuple(res)
        # the last output is always HTML: the host appends the time taken to it
        res[-1] += f"<div class='performance'><p class='time'>Time taken: {time.perf_counter() - t:.1f} sec.</p></div>"
        return tuple(res)

    return f
