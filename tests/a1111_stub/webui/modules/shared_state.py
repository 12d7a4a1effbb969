"""Mirrors modules/shared_state.py `State`: the job/progress fields `/internal/progress` reads, interrupt, previews."""

import time


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None

    def __init__(self):
        self.server_start = time.time()
        self.textinfo_history = []  # stub-only: every textinfo a job set, in order

    def __setattr__(self, key, value):
        if key == "textinfo" and value:
            self.__dict__.setdefault("textinfo_history", []).append(value)
        super().__setattr__(key, value)

    def skip(self):
        self.skipped = True

    def interrupt(self):
        self.interrupted = True

    def stop_generating(self):
        self.stopping_generation = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self):
        return {"skipped": self.skipped, "interrupted": self.interrupted, "job": self.job, "job_count": self.job_count,
                "job_no": self.job_no, "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}

    def begin(self, job="(unknown)"):
        from modules import devices

        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        devices.torch_gc()

    def end(self):
        from modules import devices

        self.job = ""
        self.job_count = 0
        devices.torch_gc()

    def assign_current_image(self, image):
        if image.mode in ("RGBA", "P"):
            image = image.convert("RGB")
        self.current_image = image
        self.id_live_preview += 1
