"""Gradio call wrappers (modules/call_queue.py): one job at a time under the queue lock, job
state begun and ended around it, flags reset afterwards, an exception turned into an error HTML
output (the host does not re-raise it)."""

from __future__ import annotations

import html
import threading
import time
import traceback
from functools import wraps

from modules import shared

queue_lock = threading.Lock()
reported_errors: list[str] = []


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        id_task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        with queue_lock:
            shared.state.begin(job=id_task)
            try:
                res = func(*args, **kwargs)
            finally:
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
