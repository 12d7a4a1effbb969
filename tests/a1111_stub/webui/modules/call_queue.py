"""Mirrors modules/call_queue.py: one queue lock shared by every GPU job, and the gradio wrappers around it.

`wrap_gradio_gpu_call` takes `queue_lock` (txt2img holds the same lock), calls `state.begin/end`, and like
`wrap_gradio_call` resets `interrupted` afterwards; exceptions become `extra_outputs + [error html]`; the last output
gets the timing html appended. `wrapped` (stub-only) records every function wrapped, so tests can assert the wrapper
was used.
"""

import html
import threading
from functools import wraps

from modules import devices, progress, shared

queue_lock = threading.RLock()
wrapped = []  # stub-only


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    wrapped.append(func)

    @wraps(func)
    def f(*args, **kwargs):
        if args and type(args[0]) == str and args[0].startswith("task(") and args[0].endswith(")"):  # noqa: E721
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

    return wrap_gradio_call(f, extra_outputs=extra_outputs)


def wrap_gradio_call(func, extra_outputs=None):
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

    @wraps(func)
    def g(*args, **kwargs):
        try:
            res = list(f(*args, **kwargs))
        except Exception as e:
            res = list(extra_outputs if extra_outputs is not None else [None, ""])
            res.append(f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>")
        devices.torch_gc()
        res[-1] += "<div class='performance'><p class='time'>Time taken: 0.0 sec.</p></div>"
        return tuple(res)

    return g
