"""Opt-in: the node pack inside a REAL ComfyUI (tested: 0.12.3 on CPU), driven over its HTTP API.

    COMFYUI_DIR=/path/to/ComfyUI pytest -m comfyui tests/test_comfy_real.py -s

Skipped unless COMFYUI_DIR is set AND `-m comfyui` selects it (a plain `pytest` never starts ComfyUI, even with
COMFYUI_DIR set). ComfyUI runs from its own Python: COMFYUI_PYTHON, else `<COMFYUI_DIR>/.venv/bin/python` (that venv
needs ComfyUI's requirements.txt plus this repo's requirements.txt). It is started with `--cpu` on a free loopback
port, with every folder (custom_nodes with this repo symlinked in, models, input, output, user, temp) in a temporary
base directory, so the checkout is never written to (tests/comfy_real_support/server.py).

What is checked, on a random-weight SD1.5 checkpoint (real layout, fp16, ~2 GB, built once and cached; see
tests/comfy_real_support/checkpoint.py) and the demo dataset resized to 256 px:
(a) the shipped example `train_style_lora_and_sample.json`, converted from UI to API format with the front-end's own
    widget rules (tests/comfy_real_support/workflow.py) and shrunk for CPU (256 px, 4 steps, 3 sampling steps), trains
    and samples; a KSampler-only prompt on the ORIGINAL model gives bit-identical latents before and after it, while
    the checkpoint stays cached (the very MODEL object that was trained on is sampled again);
(b) the saved LoRA is in models/loras, loads through the stock LoraLoader with no "lora key not loaded" line in the
    server log, and changes the sampled image;
(c) /object_info has every LoRALoop_* node, the server log has no import error, web/ is served, the examples are
    listed as templates, and every example workflow uses only known node types with widget values that match the
    front-end's widget layout; the caption example runs;
and our LoRAPrompt's `<lora:name:1>` tag gives the same latents as LoraLoader;
(d) Cancel (POST /interrupt, as the UI sends it) after 2 reported steps of a long training ends the prompt as
    interrupted with no traceback, saves `<name>-cancelled-stepNNNNNN` (N >= 2, ss_steps == N), and leaves the
    original MODEL sampling bit-identically.
About 2 minutes on a quiet 2-core CPU (1m51s measured; the checkpoint build adds ~20 s the first time), several
times longer on a busy machine; the timings are printed at the end with -s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from comfy_real_support.server import (
    ComfyServer,
    EventListener,
    RunOnce,
    cached_nodes,
    comfy_dir_or_skip,
    copy_dataset,
    execution_seconds,
    interrupted,
    make_layout,
    message_kinds,
    prompt_outputs,
    saved_latent,
    saved_pixels,
    timed,
)
from comfy_real_support.workflow import to_api, unknown_nodes, widget_values

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
DEMO = ROOT / "cli" / "demo" / "dataset"
RESOLUTION = int(os.environ.get("LORALOOP_COMFY_RESOLUTION", "256"))
TRAIN_STEPS = 4
SAMPLE_STEPS = 2  # KSampler steps everywhere (the example ships 20)
SAMPLE_CFG = 1.0  # the before/after/LoRA prompts; 1.0 skips the unconditional pass (the example keeps its 7.0)
SEED = 1234
POSITIVE = "flatstyle, a yellow star on a purple background"
NEGATIVE = "blurry, photo"
TIMINGS: dict[str, float | str] = {}


@pytest.fixture(scope="module")
def comfy_dir(request) -> Path:
    return comfy_dir_or_skip(request)


def _timed(name: str, fn, *args, **kwargs):
    return timed(TIMINGS, name, fn, *args, **kwargs)


@pytest.fixture(scope="module")
def server(comfy_dir, tmp_path_factory):
    from comfy_real_support.checkpoint import sd15_checkpoint

    ckpt = _timed("checkpoint (build or cache)", sd15_checkpoint)
    base = make_layout(tmp_path_factory.mktemp("comfyui"), ckpt)
    copy_dataset(DEMO, base / "input" / "style_dataset", RESOLUTION)
    copy_dataset(DEMO, base / "input" / "caption_dataset", RESOLUTION)
    srv = ComfyServer(comfy_dir, base, extra_args=("--disable-api-nodes",))
    _timed("server start", srv.start)
    yield srv
    srv.stop()
    print("\nreal ComfyUI timings (s):", json.dumps(TIMINGS, indent=1))
    if os.environ.get("LORALOOP_KEEP_COMFY_LOG"):
        shutil.copy(srv.log_path, os.environ["LORALOOP_KEEP_COMFY_LOG"])
    (base / "custom_nodes" / "loraloop").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


def _ckpt_name(server) -> str:
    return next(p.name for p in (server.base / "models" / "checkpoints").iterdir())


def sampling_prompt(ckpt: str, prefix: str, lora: str | None = None, tag: str | None = None) -> dict:
    """Checkpoint → (LoraLoader, or our LoRAPrompt with a `<lora:…>` tag) → KSampler with a fixed seed → SaveLatent
    (exact) + SaveImage (PNG)."""
    model, clip = ["ckpt", 0], ["ckpt", 1]
    prompt = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if lora:
        prompt["lora"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                                 "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["lora", 0], ["lora", 1]
    positive = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": POSITIVE}}
    if tag:
        positive = {"class_type": "LoRALoop_LoRAPrompt", "inputs": {"model": model, "clip": clip,
                                                                   "text": f"{tag} {POSITIVE}"}}
        model, clip = ["pos", 1], ["pos", 2]
    prompt |= {
        "pos": positive,
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": NEGATIVE}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": RESOLUTION, "height": RESOLUTION,
                                                               "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": SAMPLE_STEPS, "cfg": SAMPLE_CFG, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "denoise": 1.0}},
        "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                               "filename_prefix": f"latents/{prefix}"}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    return prompt


class Run(RunOnce):
    """The prompts, run once per module in order: caption example, before, training example, after, with LoRA."""

    def __init__(self, server, object_info) -> None:
        self.server, self.object_info, self.ckpt = server, object_info, _ckpt_name(server)
        super().__init__()

    def sample(self, name: str, lora: str | None = None, tag: str | None = None) -> dict:
        return self._once(name, lambda: self._sample(name, lora, tag))

    def _sample(self, name: str, lora: str | None, tag: str | None) -> dict:
        entry = _timed(f"prompt: sample {name}", self.server.run, sampling_prompt(self.ckpt, name, lora, tag),
                       timeout=900)
        return {"entry": entry, "latent": prompt_outputs(self.server, entry, "save_latent")[0],
                "image": prompt_outputs(self.server, entry, "save")[0], "log": self.server.log_text()}

    def train(self) -> dict:
        return self._once("train", self._train)

    def _train(self) -> dict:
        self.sample("before")
        wf = json.loads((ROOT / "example_workflows" / "train_style_lora_and_sample.json").read_text())
        prompt = shrink_for_cpu(to_api(wf, self.object_info), self.ckpt)
        log_start = len(self.server.log_text())
        entry = _timed("prompt: train example (4 steps)", self.server.run, prompt, timeout=1800)
        TIMINGS["train example: server-side execution"] = round(execution_seconds(entry), 1)
        return {"entry": entry, "prompt": prompt, "log": self.server.log_text()[log_start:]}


def shrink_for_cpu(prompt: dict, ckpt: str) -> dict:
    """The example's prompt with CPU-sized numbers; everything else as shipped."""
    by_type = {}
    for node in prompt.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert len(by_type["CheckpointLoaderSimple"]) == 1
    by_type["CheckpointLoaderSimple"][0]["ckpt_name"] = ckpt
    (config,) = by_type["LoRALoop_TrainConfig"]
    assert config["sample_prompts"] == POSITIVE and config["seed"] == 42 and config["resume_lora"] == "[none]"
    # one in-training preview (at the last step) and the final preview, 1 sampling step each
    config.update(resolution=RESOLUTION, min_bucket_reso=RESOLUTION, max_train_steps=TRAIN_STEPS,
                  sample_every_n_steps=TRAIN_STEPS, sample_steps=1, learning_rate=1e-3, lr_warmup_steps=0,
                  train_text_encoder=True, text_encoder_lr=1e-3)  # the CLIP trains too: its keys must load as well
    for latent in by_type["EmptyLatentImage"]:
        latent.update(width=RESOLUTION, height=RESOLUTION)
    for sampler in by_type["KSampler"]:
        sampler.update(steps=SAMPLE_STEPS)
    return prompt


@pytest.fixture(scope="module")
def run(server, object_info) -> Run:
    return Run(server, object_info)


# -- (c) the pack loads, the examples are valid ---------------------------------------------------------------------
def test_every_node_registered_and_no_import_error(server, object_info):
    # Read from the source, not by importing: in a full run the stand-in's folder_paths may already be imported here.
    source = (ROOT / "nodes" / "definitions.py").read_text()
    expected = {"LoRALoop_" + m for m in re.findall(r'node_id=PREFIX \+ "(\w+)"', source)}
    assert len(expected) == 8  # LoadDataset, Caption, TrainConfig, MemoryPlan, TrainLoRA, SaveLoRA, Resize, Prompt
    assert expected == {k for k in object_info if k.startswith("LoRALoop_")}
    for node_id in expected:
        assert object_info[node_id]["python_module"] == "custom_nodes.loraloop"
    log = server.log_text()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-4000:]
    assert "loraloop" in log  # listed under "Import times for custom nodes"
    assert "/extensions/loraloop/loraloop.js" in server.get("/extensions")  # WEB_DIRECTORY is served


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_uses_known_nodes_and_matches_the_frontend_widgets(object_info, path):
    wf = json.loads(path.read_text())
    assert unknown_nodes(wf, object_info) == []
    for node in wf["nodes"]:
        widget_values(node, object_info[node["type"]])  # raises on a count mismatch
    to_api(wf, object_info)


def test_example_templates_are_served(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get("loraloop", [])) == sorted(p.stem for p in EXAMPLES)


def test_caption_example_runs(server, object_info):
    wf = json.loads((ROOT / "example_workflows" / "caption_a_folder.json").read_text())
    prompt = to_api(wf, object_info)
    load = next(n for n in prompt.values() if n["class_type"] == "LoRALoop_LoadDataset")
    load["inputs"]["folder"] = "caption_dataset"
    entry = _timed("prompt: caption example", server.run, prompt, timeout=300)
    folder = server.base / "input" / "caption_dataset"
    sidecars = sorted(folder.glob("*.txt"))
    assert len(sidecars) == 12
    assert all(p.read_text().startswith("flatstyle, flat illustration, ") for p in sidecars)
    texts = [o for out in entry["outputs"].values() for o in out.get("text", [])]
    assert any("flatstyle" in t for t in texts)


# -- (a) training leaves the original model untouched ---------------------------------------------------------------
def test_training_example_runs_and_saves_a_lora(run):
    train = run.train()
    outputs = train["entry"]["outputs"]
    texts = [t for out in outputs.values() for t in out.get("text", [])]
    assert any(f"trained {TRAIN_STEPS} steps" in t for t in texts), texts
    assert any("saved flatstyle.safetensors in models/loras" in t for t in texts), texts
    assert (run.server.base / "models" / "loras" / "flatstyle.safetensors").is_file()
    assert (run.server.base / "models" / "loras" / "flatstyle.json").is_file()
    assert "lora key not loaded" not in train["log"]  # TrainLoRA applies the LoRA to its MODEL output itself
    assert any("memory plan:" in t and "estimated peak" in t for t in texts), texts  # MemoryPlan and TrainLoRA
    from safetensors import safe_open

    with safe_open(str(run.server.base / "models" / "loras" / "flatstyle.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys)
    images = [i for out in outputs.values() for i in out.get("images", [])]
    assert images, "no image from the example's KSampler/PreviewImage"


def test_original_model_samples_identically_before_and_after_training(run):
    before = run.sample("before")
    run.train()
    after = run.sample("after")
    ckpt_node, sampler = "ckpt", "sample"
    assert ckpt_node in cached_nodes(after["entry"]), "the checkpoint was reloaded: the check would prove nothing"
    assert sampler not in cached_nodes(after["entry"]), "KSampler came from the cache"
    import torch

    a, b = saved_latent(before["latent"]), saved_latent(after["latent"])
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), f"max |Δ| = {(a - b).abs().max().item()}"
    assert (saved_pixels(before["image"]) == saved_pixels(after["image"])).all()


# -- (b) the saved file works with the stock LoraLoader --------------------------------------------------------------
def test_saved_lora_loads_in_stock_loraloader_and_changes_the_image(run):
    run.train()
    names = run.server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "flatstyle.safetensors" in names
    log_start = len(run.server.log_text())
    with_lora = run.sample("with_lora", lora="flatstyle.safetensors")
    log = with_lora["log"][log_start:]
    assert "lora key not loaded" not in log, log[-4000:]
    assert "ERROR" not in log, log[-4000:]
    import torch

    base, lora = saved_latent(run.sample("before")["latent"]), saved_latent(with_lora["latent"])
    assert torch.isfinite(lora).all()
    assert not torch.equal(base, lora)
    diff = abs(saved_pixels(run.sample("before")["image"]) - saved_pixels(with_lora["image"]))
    assert diff.max() > 0, "the LoRA did not change the decoded image"
    TIMINGS["lora image mean |Δ| (0-255)"] = round(float(diff.mean()), 3)


def test_lora_prompt_tag_applies_the_saved_lora_like_loraloader(run):
    """`<lora:flatstyle:1>` in our LoRAPrompt gives bit-identical latents to LoraLoader at 1.0/1.0."""
    run.train()
    tagged = run.sample("lora_prompt", tag="<lora:flatstyle:1>")
    import torch

    loader = run.sample("with_lora", lora="flatstyle.safetensors")
    assert torch.equal(saved_latent(tagged["latent"]), saved_latent(loader["latent"]))


def test_training_with_uncached_latents_and_shuffled_captions(run):
    """cache_latents off and shuffled captions: images and text are encoded every step through the VAE/CLIP that
    TrainLoRA loaded beside the UNet (no model-management call mid-training); the run ends and the model is intact."""
    run.train()  # after the main example, so the comparisons above are not disturbed
    wf = json.loads((ROOT / "example_workflows" / "train_style_lora_and_sample.json").read_text())
    prompt = shrink_for_cpu(to_api(wf, run.object_info), run.ckpt)
    (config,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "LoRALoop_TrainConfig"]
    config.update(cache_latents=False, shuffle_caption=True, max_train_steps=2, sample_every_n_steps=0,
                  train_text_encoder=False, seed=7)
    for node in prompt.values():
        if node["class_type"] == "LoRALoop_TrainLoRA":
            node["inputs"]["name"] = "uncached"
        if node["class_type"] == "LoRALoop_SaveLoRA":
            node["inputs"]["name"] = "uncached"
    log_start = len(run.server.log_text())
    entry = _timed("prompt: train uncached latents (2 steps)", run.server.run, prompt, timeout=1800)
    texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
    assert any("trained 2 steps" in t for t in texts), texts
    log = run.server.log_text()[log_start:]
    assert "Traceback" not in log and "lora key not loaded" not in log, log[-4000:]
    after = run.sample("after_uncached")
    assert (saved_pixels(run.sample("before")["image"]) == saved_pixels(after["image"])).all()


CANCEL_NAME = "cancelflat"
CANCEL_AFTER_STEPS = 2


def test_cancel_mid_training_saves_the_last_completed_step(run):
    """Cancel the way the UI does (POST /interrupt) while a long training runs: the prompt ends as interrupted (no
    traceback), `<name>-cancelled-stepNNNNNN` holds what was trained (N >= the steps reported before the cancel, and
    its ss_steps says N), and the original MODEL samples exactly as before. On ComfyUI 0.33 the interrupt is raised
    inside an op's forward (mid-step); a cancel there used to save nothing."""
    before = run.sample("before")  # in a full run: from the start, before any training
    wf = json.loads((ROOT / "example_workflows" / "train_style_lora_and_sample.json").read_text())
    prompt = shrink_for_cpu(to_api(wf, run.object_info), run.ckpt)
    (config,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "LoRALoop_TrainConfig"]
    config.update(max_train_steps=100_000, sample_every_n_steps=0, train_text_encoder=False, seed=11)
    (train_id,) = [k for k, n in prompt.items() if n["class_type"] == "LoRALoop_TrainLoRA"]
    prompt[train_id]["inputs"].update(name=CANCEL_NAME, save_on_cancel=True)
    for node in prompt.values():
        if node["class_type"] == "LoRALoop_SaveLoRA":
            node["inputs"]["name"] = CANCEL_NAME
    loras = run.server.base / "models" / "loras"
    assert not list(loras.glob(f"{CANCEL_NAME}*"))
    log_start = len(run.server.log_text())
    client_id = "loraloop-cancel-test"
    listener = EventListener(run.server, client_id=client_id)
    t0 = time.perf_counter()
    try:
        prompt_id = run.server.queue(prompt, client_id=client_id)
        deadline = time.monotonic() + 900
        while max(listener.loss_steps(train_id), default=0) < CANCEL_AFTER_STEPS:
            entry = run.server.get(f"/history/{prompt_id}").get(prompt_id)
            assert not entry, f"the prompt ended before {CANCEL_AFTER_STEPS} steps: {json.dumps(entry)[:4000]}"
            assert time.monotonic() < deadline, f"no step {CANCEL_AFTER_STEPS} after 900 s:\n{run.server.log_tail()}"
            time.sleep(0.2)
        reported = max(listener.loss_steps(train_id))
        run.server.post("/interrupt", {"prompt_id": prompt_id})  # what the front-end's Cancel sends
        entry = run.server.wait(prompt_id, timeout=600, interrupted_ok=True)
    finally:
        listener.close()
    TIMINGS["prompt: cancelled training"] = round(time.perf_counter() - t0, 1)
    log = run.server.log_text()[log_start:]
    # (b) ended as interrupted by the user, at TrainLoRA, without a Python error
    assert interrupted(entry), (message_kinds(entry), log[-4000:])
    (stopped,) = [d for kind, d in entry["status"]["messages"] if kind == "execution_interrupted"]
    assert stopped["node_id"] == train_id, stopped
    assert "Traceback" not in log and "!!! Exception" not in log, log[-4000:]
    # (a) the last completed step is saved, and says so
    files = sorted(loras.glob(f"{CANCEL_NAME}*"))
    assert len(files) == 1, (files, log[-4000:])
    match = re.fullmatch(rf"{CANCEL_NAME}-cancelled-step(\d{{6}})\.safetensors", files[0].name)
    assert match, (files[0].name, log[-4000:])
    steps = int(match.group(1))
    assert steps >= reported >= CANCEL_AFTER_STEPS, (steps, reported)
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
    assert int(meta["ss_steps"]) == steps, meta.get("ss_steps")
    assert meta["ss_output_name"] == CANCEL_NAME
    assert any(k.startswith("lora_unet_") for k in keys)
    assert files[0].name in log  # the node's status line: "saved what was trained so far to …"
    TIMINGS["cancel: steps reported / saved"] = f"{reported} / {steps}"
    TIMINGS["cancel: file"] = files[0].name
    # (c) the original MODEL (the very cached object) samples exactly as before the training
    after = run.sample("after_cancel")
    assert "ckpt" in cached_nodes(after["entry"]), "the checkpoint was reloaded: the check would prove nothing"
    import torch

    assert torch.equal(saved_latent(before["latent"]), saved_latent(after["latent"]))
    assert (saved_pixels(before["image"]) == saved_pixels(after["image"])).all()
