"""LoRA Loop inside AUTOMATIC1111 stable-diffusion-webui (v1.10.x) and, detected with a clear message, Forge.

Entry point: scripts/loraloop_tab.py → `entry.register`. Modules:
  webui    every call into the webui (`modules.*`, the built-in Lora extension), imported lazily
  bundle   `WebuiBundle`: the engine's ModelBundle over shared.sd_model (SD1/SD2/SD2-v/SDXL)
  job      one training run: clean weights in, restored model out, files into --lora-dir
  form     the tab's fields from TrainConfig's metadata; widget ⇄ config ⇄ YAML
  actions  the tab's button handlers (no Gradio); ui: the Gradio layout; api: /loraloop/v1/* routes
  sink     progress into shared.state; captions: caption tools; plan: run plan (+ memory planner placeholder)
  forge    Forge detection and what is not supported there
Importing this package never imports the webui or Gradio.
"""
