"""Stand-in for comfy/utils.py (ComfyUI 0.12.3): ProgressBar and its global hook, load_torch_file."""

PROGRESS_BAR_HOOK = None
updates = []  # (value, total, preview, node_id), recorded by the default hook


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


def default_hook(value, total, preview, node_id=None):
    """What main.hijack_progress installs: check the interrupt flag, then report."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
    updates.append((value, total, preview, node_id))


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        value = min(value, self.total)
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    from safetensors.torch import load_file

    return load_file(ckpt)
