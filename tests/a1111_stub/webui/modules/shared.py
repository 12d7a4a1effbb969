"""Mirrors the globals of modules/shared.py that extensions read: sd_model, state, opts, cmd_opts.

In the webui `sd_model` is a property that loads the checkpoint on first access; here tests assign it.
"""

from pathlib import Path
from types import SimpleNamespace

from modules import interrogate, options, paths_internal, shared_state

cmd_opts = SimpleNamespace(
    lora_dir=str(Path(paths_internal.models_path) / "Lora"),  # added by extensions-builtin/Lora/preload.py
    lyco_dir_backcompat=str(Path(paths_internal.models_path) / "LyCORIS"),
    lowvram=False, medvram=False, medvram_sdxl=False, api=True, nowebui=False, api_auth=None,
    freeze_settings=False, data_dir=paths_internal.data_path, no_half=True, use_cpu=["all"],
)
opts = options.Options({
    "emphasis": "Original",  # shared_options.py:177
    "CLIP_stop_at_last_layers": 1,
    "training_xattention_optimizations": False,  # shared_options.py:164
    "unload_models_when_training": False,
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    "live_previews_enable": True,
    "memmon_poll_rate": 0,
    "profiling_enable": False,
    "interrogate_keep_models_in_memory": False,  # shared_options.py:260
    "interrogate_deepbooru_score_threshold": 0.5,
})
state = shared_state.State()
interrogator = interrogate.InterrogateModels("interrogate")  # shared_init.py:52 sets it at start-up
sd_model = None
demo = None
parallel_processing_allowed = True
