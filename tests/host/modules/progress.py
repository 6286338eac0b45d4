"""Task progress the page polls (modules/progress.py).

A task id is the string `task(...)` the page's javascript makes (`randomId()`) and sends as the first
argument of a job wrapped in `call_queue.wrap_gradio_gpu_call`. The wrapper puts the id in
`pending_tasks` (with the time it was queued) before it waits for the queue lock, makes it
`current_task` once it holds the lock, records the job's result and, finished or failed, appends the
id to `finished_tasks` (the last 16 kept; a job without an id appends None, as in the host).

`setup_progress_api(app)` adds `POST /internal/progress` (`ProgressRequest` in, `ProgressResponse`
out) and `GET /internal/pending-tasks`, as webui.py does after gradio's launch. `progressapi` answers
for any id: not the current task gives "Waiting..." or "In queue: i/n" (by the time queued) with no
progress; the current task gives the progress of `shared.state` (`job_no / job_count` plus the
sampling step's share of one job), an ETA from `state.time_start`, and `state.textinfo`.
The double makes no live previews, so `live_preview` is always None and `id_live_preview` the one
asked with, as in the host before its first preview.
"""

from __future__ import annotations

import base64
import io
import random
import string
import time
from collections import OrderedDict

from pydantic import BaseModel, Field

from modules import shared

current_task = None
pending_tasks: OrderedDict = OrderedDict()
finished_tasks: list = []
recorded_results: list = []
recorded_results_limit = 2


def start_task(id_task) -> None:
    global current_task

    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task) -> None:
    global current_task

    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        del finished_tasks[0]


def create_task_id(task_type: str) -> str:
    """`task(<type>-<7 random upper-case letters or digits>)`."""
    suffix = "".join(random.choices(string.ascii_uppercase + string.digits, k=7))
    return f"task({task_type}-{suffix})"


def record_results(id_task, res) -> None:
    recorded_results.append((id_task, res))
    if len(recorded_results) > recorded_results_limit:
        del recorded_results[0]


def add_task_to_queue(id_job) -> None:
    pending_tasks[id_job] = time.time()


def reset() -> None:
    """A fresh process (double only; the harness calls it)."""
    global current_task

    current_task = None
    pending_tasks.clear()
    finished_tasks.clear()
    recorded_results.clear()


class PendingTasksResponse(BaseModel):
    size: int = Field(title="Pending task size")
    tasks: list[str] = Field(title="Pending task ids")


class ProgressRequest(BaseModel):
    id_task: str = Field(default=None, title="Task ID", description="id of the task to get progress for")
    id_live_preview: int = Field(default=-1, title="Live preview image ID",
                                 description="id of last received last preview image")
    live_preview: bool = Field(default=True, title="Include live preview",
                               description="boolean flag indicating whether to include the live preview image")


class ProgressResponse(BaseModel):
    active: bool = Field(title="Whether the task is being worked on right now")
    queued: bool = Field(title="Whether the task is in queue")
    completed: bool = Field(title="Whether the task has already finished")
    progress: float = Field(default=None, title="Progress", description="The progress with a range of 0 to 1")
    eta: float = Field(default=None, title="ETA in secs")
    live_preview: str = Field(default=None, title="Live preview image", description="Current live preview; a data: uri")
    id_live_preview: int = Field(default=None, title="Live preview image ID",
                                 description="Send this together with next request to prevent receiving same image")
    textinfo: str = Field(default=None, title="Info text", description="Info text used by WebUI.")


def setup_progress_api(app):
    app.add_api_route("/internal/pending-tasks", get_pending_tasks, methods=["GET"])
    return app.add_api_route("/internal/progress", progressapi, methods=["POST"], response_model=ProgressResponse)


def get_pending_tasks() -> PendingTasksResponse:
    ids = list(pending_tasks)
    return PendingTasksResponse(size=len(ids), tasks=ids)


def progressapi(req: ProgressRequest) -> ProgressResponse:
    active = req.id_task == current_task
    queued = req.id_task in pending_tasks
    completed = req.id_task in finished_tasks

    if not active:
        textinfo = "Waiting..."
        if queued:
            by_time = sorted(pending_tasks, key=lambda task: pending_tasks[task])
            textinfo = f"In queue: {by_time.index(req.id_task) + 1}/{len(by_time)}"
        return ProgressResponse(active=active, queued=queued, completed=completed, id_live_preview=-1,
                                textinfo=textinfo)

    state = shared.state
    job_count, job_no = state.job_count, state.job_no
    sampling_steps, sampling_step = state.sampling_steps, state.sampling_step
    progress = 0
    if job_count > 0:
        progress += job_no / job_count
    if sampling_steps > 0 and job_count > 0:
        progress += 1 / job_count * sampling_step / sampling_steps
    progress = min(progress, 1)

    elapsed = time.time() - state.time_start
    eta = elapsed / progress - elapsed if progress > 0 else None

    live_preview = None
    id_live_preview = req.id_live_preview
    if shared.opts.live_previews_enable and req.live_preview:
        state.set_current_image()
        if state.id_live_preview != req.id_live_preview and state.current_image is not None:
            image_format = shared.opts.live_previews_image_format
            if image_format == "png":
                save_kwargs = {"optimize": True} if max(*state.current_image.size) <= 256 else \
                    {"optimize": False, "compress_level": 1}
            else:
                save_kwargs = {}
            buffer = io.BytesIO()
            state.current_image.save(buffer, format=image_format, **save_kwargs)
            live_preview = f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
            id_live_preview = state.id_live_preview

    return ProgressResponse(active=active, queued=queued, completed=completed, progress=progress, eta=eta,
                            live_preview=live_preview, id_live_preview=id_live_preview, textinfo=state.textinfo)


def restore_progress(id_task):
    """Waits while the task is current or queued, then gives its recorded result, or four outputs
    saying it could not (the host's txt2img/img2img restore button)."""
    import gradio as gr

    while id_task == current_task or id_task in pending_tasks:
        time.sleep(0.1)
    res = next((r for task, r in recorded_results if task == id_task), None)
    if res is not None:
        return res
    return (gr.update(), gr.update(), gr.update(),
            f"Couldn't restore progress for {id_task}: results either have been discarded or never were obtained")
