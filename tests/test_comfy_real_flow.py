"""Opt-in: LoRA Loop's nodes train Flux.1 and SD3 LoRAs inside a REAL ComfyUI (tested: 0.12.3 and 0.33 on CPU), driven
over its HTTP API, and the stock LoraLoader loads every key of the result.

    COMFYUI_DIR=/path/to/ComfyUI pytest -m comfyui tests/test_comfy_real_flow.py -s

Skipped unless COMFYUI_DIR is set AND `-m comfyui` selects it, exactly like tests/test_comfy_real.py (same server
helper, same throw-away base directory; ComfyUI's python from COMFYUI_PYTHON or `<COMFYUI_DIR>/.venv/bin/python`).

Models (tests/comfy_real_support/flow_checkpoints.py; built once, ~15 s, and cached): a Flux.1-dev and an SD3
diffusion model in the real single-file layouts at the least size ComfyUI's detection allows (1-2 M parameters),
loaded with the stock UNETLoader from models/diffusion_models; the full-size random 16-channel VAE (stock VAELoader);
tiny CLIP-L/CLIP-G/T5 text encoders, which ComfyUI's own loaders cannot build at that size, loaded by a TEST-ONLY node
(tests/comfy_real_support/test_nodes, linked into the temporary custom_nodes by this test only) that assembles the
CLIP from ComfyUI's own Flux/SD3 text-encoder classes. The demo dataset is resized to 256 px.

Per family, in order on one server: a KSampler prompt on the original model ("before"); LoadDataset →
LoRATrainConfig → TrainLoRA (4 steps, the CLIP's text encoders trained too) → SaveLoRA; the "before" prompt again
("after"; the loaders come from ComfyUI's cache, so the very MODEL trained on is sampled); the same prompt through
the stock LoraLoader. Checked: the training reports its steps and saves UNet and text-encoder keys; "after" is
bit-identical to "before" (latents and PNG); the LoRA prompt logs no "lora key not loaded" (nor any missing/
unexpected weight) and gives another image.
80 s (0.33) to 170 s (0.12.3) on a 2-core CPU (up to ~4 minutes when other jobs share it; building the model
files adds ~15 s the first time); timings are printed at the end with -s.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from comfy_real_support.server import (
    ComfyServer,
    RunOnce,
    cached_nodes,
    comfy_dir_or_skip,
    copy_dataset,
    execution_seconds,
    make_layout,
    prompt_outputs,
    saved_latent,
    saved_pixels,
    timed,
)

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "cli" / "demo" / "dataset"
RESOLUTION = int(os.environ.get("LORALOOP_COMFY_FLOW_RESOLUTION", "256"))
TRAIN_STEPS = 4
SAMPLE_STEPS = 2
SEED = 1234
POSITIVE = "flatstyle, a yellow star on a purple background"
FOLDER = "flow_dataset"
FAMILIES = ("flux", "sd3")
TIMINGS: dict[str, float | str] = {}


@pytest.fixture(scope="module")
def comfy_dir(request) -> Path:
    return comfy_dir_or_skip(request)


def _timed(name: str, fn, *args, **kwargs):
    return timed(TIMINGS, name, fn, *args, **kwargs)


@pytest.fixture(scope="module")
def families(comfy_dir) -> dict:
    from comfy_real_support.flow_checkpoints import flow_family

    return _timed("models (build or cache)", lambda: {name: flow_family(name) for name in FAMILIES})


@pytest.fixture(scope="module")
def server(comfy_dir, families, tmp_path_factory):
    from comfy_real_support.flow_checkpoints import link_models, link_test_nodes

    base = make_layout(tmp_path_factory.mktemp("comfyui-flow"))
    for family in families.values():
        link_models(base, family)
    link_test_nodes(base)
    copy_dataset(DEMO, base / "input" / FOLDER, RESOLUTION)
    srv = ComfyServer(comfy_dir, base, extra_args=("--disable-api-nodes",))
    _timed("server start", srv.start)
    yield srv
    srv.stop()
    print("\nreal ComfyUI flow timings (s):", json.dumps(TIMINGS, indent=1))
    if os.environ.get("LORALOOP_KEEP_COMFY_LOG"):
        shutil.copy(srv.log_path, os.environ["LORALOOP_KEEP_COMFY_LOG"])
    for link in (base / "custom_nodes").iterdir():
        link.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


def sampling_prompt(family, prefix: str, lora: str | None = None) -> dict:
    """loaders → (LoraLoader) → CLIPTextEncode → KSampler (fixed seed, cfg 1) → SaveLatent (exact) + SaveImage."""
    prompt = family.loader_nodes()
    model, clip = ["unet", 0], ["clip", 0]
    if lora:
        prompt["lora"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                                 "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["lora", 0], ["lora", 1]
    prompt |= {
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": POSITIVE}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "empty": {"class_type": family.latent_node, "inputs": {"width": RESOLUTION, "height": RESOLUTION,
                                                               "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": SAMPLE_STEPS, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": family.scheduler, "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["empty", 0], "denoise": 1.0}},
        "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                               "filename_prefix": f"latents/{prefix}"}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    return prompt


def training_prompt(family, object_info: dict, name: str) -> dict:
    info = object_info["LoRALoop_TrainConfig"]["input"]
    config = {key: spec[1]["default"] for part in ("required", "optional") for key, spec in info.get(part, {}).items()
              if isinstance(spec[1], dict) and "default" in spec[1]}
    config.update(resolution=RESOLUTION, enable_bucket=False, min_bucket_reso=RESOLUTION, max_train_steps=TRAIN_STEPS,
                  learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0, seed=42,
                  train_text_encoder=True, text_encoder_lr=1e-3,  # the CLIP-L (and CLIP-G) keys must load too
                  sample_prompts=POSITIVE, sample_every_n_steps=TRAIN_STEPS, sample_steps=1)
    return family.loader_nodes() | {
        "data": {"class_type": "LoRALoop_LoadDataset", "inputs": {"folder": FOLDER, "recursive": False,
                                                                  "caption_extension": ".txt"}},
        "config": {"class_type": "LoRALoop_TrainConfig", "inputs": config},
        "train": {"class_type": "LoRALoop_TrainLoRA", "inputs": {
            "model": ["unet", 0], "clip": ["clip", 0], "vae": ["vae", 0], "dataset": ["data", 0],
            "config": ["config", 0], "name": name, "save_on_cancel": False, "preview_steps": 1}},
        "save": {"class_type": "LoRALoop_SaveLoRA", "inputs": {"lora": ["train", 0], "name": name}},
    }


def _texts(entry: dict) -> list[str]:
    return [t for out in entry["outputs"].values() for t in out.get("text", [])]


class FlowRun(RunOnce):
    """One family's prompts, each run once, in order: before, train, after, with the LoRA."""

    def __init__(self, server, object_info: dict, family) -> None:
        self.server, self.object_info, self.family = server, object_info, family
        self.lora = f"tiny{family.name}"
        super().__init__()

    def _run(self, label: str, prompt: dict, timeout: float) -> tuple[dict, str]:
        start = len(self.server.log_text())
        entry = _timed(f"{self.family.name}: {label}", self.server.run, prompt, timeout=timeout)
        return entry, self.server.log_text()[start:]

    def sample(self, name: str, lora: str | None = None) -> dict:
        def go() -> dict:
            entry, log = self._run(f"sample {name}", sampling_prompt(self.family, f"{self.family.name}_{name}", lora),
                                   900)
            return {"entry": entry, "latent": prompt_outputs(self.server, entry, "save_latent")[0],
                    "image": prompt_outputs(self.server, entry, "save")[0], "log": log}

        return self._once(name, go)

    def train(self) -> dict:
        def go() -> dict:
            self.sample("before")
            entry, log = self._run(f"train {TRAIN_STEPS} steps", training_prompt(self.family, self.object_info,
                                                                                self.lora), 1800)
            TIMINGS[f"{self.family.name}: training prompt, server-side"] = round(execution_seconds(entry), 1)
            return {"entry": entry, "log": log}

        return self._once("train", go)

    def with_lora(self) -> dict:
        self.sample("after")  # before LoraLoader ever runs: the original MODEL, just after training
        return self.sample("with_lora", lora=f"{self.lora}.safetensors")


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, server, object_info, families) -> FlowRun:
    """Module-scoped and parametrized: pytest runs every test of one family before the next family's."""
    return FlowRun(server, object_info, families[request.param])


def test_test_nodes_and_models_load_cleanly(server, object_info):
    assert "LoRALoopTest_TinyCLIPLoader" in object_info
    assert any(k.startswith("LoRALoop_") for k in object_info)
    for name in ("UNETLoader", "VAELoader", "LoraLoader", "EmptySD3LatentImage"):
        assert name in object_info, name
    log = server.log_text()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-4000:]


def test_training_runs_and_saves_unet_and_text_encoder_keys(run):
    train = run.train()
    texts = _texts(train["entry"])
    assert any(f"trained {TRAIN_STEPS} steps" in t for t in texts), texts
    assert any(f"saved {run.lora}.safetensors in models/loras" in t for t in texts), texts
    log = train["log"]
    assert "Traceback" not in log and "lora key not loaded" not in log, log[-4000:]
    for problem in ("unet missing", "unet unexpected", "clip missing", "clip unexpected"):
        assert problem not in run.server.log_text(), f"{problem}: the test files do not match ComfyUI's layout"
    from safetensors import safe_open

    with safe_open(str(run.server.base / "models" / "loras" / f"{run.lora}.safetensors"), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    prefixes = {"flux": ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_"),
                "sd3": ("lora_unet_joint_blocks_", "lora_te1_", "lora_te2_")}[run.family.name]
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), (prefix, sorted(keys)[:20])
    assert int(meta["ss_steps"]) == TRAIN_STEPS
    TIMINGS[f"{run.family.name}: LoRA tensors"] = len(keys)


def test_original_model_samples_identically_before_and_after_training(run):
    before = run.sample("before")
    run.train()
    after = run.sample("after")
    assert "unet" in cached_nodes(after["entry"]), "the model was reloaded: the check would prove nothing"
    assert "sample" not in cached_nodes(after["entry"]), "KSampler came from the cache"
    import torch

    a, b = saved_latent(before["latent"]), saved_latent(after["latent"])
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), f"max |Δ| = {(a - b).abs().max().item()}"
    assert (saved_pixels(before["image"]) == saved_pixels(after["image"])).all()


def test_saved_lora_loads_in_stock_loraloader_and_changes_the_image(run):
    run.train()
    names = run.server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert f"{run.lora}.safetensors" in names
    with_lora = run.with_lora()
    log = with_lora["log"]
    not_loaded = [line for line in log.splitlines() if "lora key not loaded" in line]
    assert not not_loaded, f"{len(not_loaded)} keys not loaded, e.g. {not_loaded[:5]}"
    assert "ERROR" not in log and "Traceback" not in log, log[-4000:]
    import torch

    base, lora = saved_latent(run.sample("before")["latent"]), saved_latent(with_lora["latent"])
    assert torch.isfinite(lora).all()
    assert not torch.equal(base, lora)
    diff = abs(saved_pixels(run.sample("before")["image"]) - saved_pixels(with_lora["image"]))
    assert diff.max() > 0, "the LoRA did not change the decoded image"
    TIMINGS[f"{run.family.name}: latent mean |Δ| with the LoRA"] = round(float((base - lora).abs().mean()), 5)
    TIMINGS[f"{run.family.name}: image mean |Δ| (0-255)"] = round(float(diff.mean()), 3)
