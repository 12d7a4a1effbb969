"""Opt-in: LoRA Loop inside a real AUTOMATIC1111 webui, driven over HTTP. Not run in CI.

    A1111_DIR=/path/to/stable-diffusion-webui pytest -m a1111 tests/test_a1111_real_webui.py
    A1111_DIR=/path/to/sd-webui-forge-classic pytest -m a1111 tests/test_a1111_real_webui.py   # Forge Classic too

What it does: writes a random-weight, full-size SD1.5 checkpoint, starts the webui on CPU
(`--use-cpu all --no-half --skip-torch-cuda-test --api`, offline) with this repository as its only added extension
(symlinked into a temporary --data-dir), checks that the "LoRA Loop" tab was built, renders a base image with
/sdapi/v1/txt2img, trains a few steps with POST /loraloop/v1/train, and checks that `<lora:name:1>` changes the next
image (found without a restart), that the base image is unchanged afterwards (the model was handed back
bit-identical) and that the card files are there. Takes several minutes and ~12 GB RAM.

Prerequisites (nothing is downloaded):
* A1111_DIR: a v1.10.x checkout whose repositories/ folder holds the five repos launch.py clones
  (stable-diffusion-stability-ai, generative-models, k-diffusion, BLIP, stable-diffusion-webui-assets).
* A1111_PYTHON (default: <A1111_DIR>/venv/bin/python, else this interpreter): the webui's environment with its
  requirements_versions.txt installed, plus LoRA Loop's requirements. With the webui's transformers 4.30.2 that means
  peft<=0.13.2 (later peft imports transformers.Cache), pyyaml, safetensors; diffusers is not needed in the webui.
* Nothing else: the webui's FrozenCLIPEmbedder loads openai/clip-vit-large-patch14's config and tokenizer from the
  Hugging Face cache even when the checkpoint holds the weights (docs/hosts.md §10), so the test seeds a private HF_HOME
  from what this repository ships (`seed_hf_cache`); set A1111_HF_HOME to use another cache instead.

Set up and tested with v1.10.1 on Python 3.11 and CPU torch 2.14.1 (the webui's requirements_versions.txt with
setuptools relaxed to >=77.0.3,<81, which torch 2.14 needs): see a1111/README.md, "Testing against a real
webui". The numbers (timings, mean |Δ| of the LoRA image) are printed; run with -s to see them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.a1111

A1111_DIR = os.environ.get("A1111_DIR")
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = float(os.environ.get("A1111_START_TIMEOUT", "1200"))


def _python(webui_dir: Path) -> str:
    if os.environ.get("A1111_PYTHON"):
        return os.environ["A1111_PYTHON"]
    for candidate in (webui_dir / "venv" / "bin" / "python", webui_dir / "venv" / "Scripts" / "python.exe"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base: str, path: str, payload: dict | None = None, timeout: float = 1800) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if payload is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:  # the webui's answer says what went wrong
        raise AssertionError(f"{path} answered {err.code}: {err.read().decode(errors='replace')[:3000]}") from None


def write_random_sd15(path: Path) -> Path:
    """A full-size SD1.5 checkpoint with seeded random weights, in the webui's single-file layout (fp16)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from helpers.ldm_checkpoint import ldm_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraloop.trainer.bundles.checkpoint import shipped_config_dir
    from loraloop.trainer.bundles.diffusers_bundle import DiffusersBundle
    from loraloop.trainer.families import get_family
    from loraloop.trainer.schedule import scaled_linear_alphas_cumprod
    from loraloop.trainer.tokenizer import load_clip_tokenizer

    configs = shipped_config_dir("sd1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
        # A fresh final LayerNorm (weight 1, bias 0) makes every token's embedding average exactly 0, and the webui's
        # "Original" emphasis rescales the conditioning by mean / mean of it (sd_emphasis.py): NaN images. A trained
        # CLIP has a learned bias; give the random one a seeded one.
        with torch.no_grad():
            next(m for n, m in te.named_modules() if n.endswith("final_layer_norm")).bias.normal_(0.0, 0.5)
    bundle = DiffusersBundle(get_family("sd1"), unet, vae, [te], [load_clip_tokenizer("clip-l")],
                             scaled_linear_alphas_cumprod(), "random-sd15")
    from safetensors.torch import save_file

    state = {k: v.half() if v.is_floating_point() else v for k, v in ldm_state_dict(bundle).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


CLIP_L_REPO = "openai/clip-vit-large-patch14"
CLIP_L_REVISION = "0" * 40  # any commit hash: the cache's refs/main names the snapshot folder


def seed_hf_cache(hf_home: Path) -> Path:
    """A Hugging Face cache holding openai/clip-vit-large-patch14's config and tokenizer, made offline from what this
    repository ships: the CLIP-L text config (model_configs/sd1/text_encoder) and the tokenizer files rebuilt from
    open-clip-torch's BPE vocabulary (loraloop.trainer.tokenizer). The webui's FrozenCLIPEmbedder reads them even when
    the checkpoint holds the weights (docs/hosts.md §10). Returns the snapshot folder."""
    from loraloop.trainer.bundles.checkpoint import shipped_config_dir
    from loraloop.trainer.tokenizer import PAD_TOKENS, write_tokenizer_files

    repo = hf_home / "hub" / ("models--" + CLIP_L_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / CLIP_L_REVISION
    if not (snapshot / "vocab.json").is_file():
        write_tokenizer_files(snapshot, PAD_TOKENS["clip-l"])
    shutil.copyfile(shipped_config_dir("sd1") / "text_encoder" / "config.json", snapshot / "config.json")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(CLIP_L_REVISION, encoding="utf-8")
    return snapshot


def _dataset(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i, color in enumerate(["red", "green", "blue", "orange"]):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).rectangle((12, 12, 52, 52), fill=color)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"llstyle, a {color} square", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def webui_server(tmp_path_factory):
    if not A1111_DIR:
        pytest.skip("set A1111_DIR to a stable-diffusion-webui v1.10.x checkout to run the real-webui test")
    webui_dir = Path(A1111_DIR).resolve()
    if not (webui_dir / "launch.py").is_file():
        pytest.fail(f"A1111_DIR={webui_dir} has no launch.py")
    tmp = tmp_path_factory.mktemp("a1111")
    data = tmp / "data"
    (data / "extensions").mkdir(parents=True)
    (data / "extensions" / "loraloop").symlink_to(ROOT, target_is_directory=True)
    ckpt = write_random_sd15(data / "models" / "Stable-diffusion" / "random-sd15.safetensors")
    hf_home = Path(os.environ["A1111_HF_HOME"]) if os.environ.get("A1111_HF_HOME") else tmp / "hf_home"
    if not os.environ.get("A1111_HF_HOME"):
        seed_hf_cache(hf_home)
    port = _free_port()
    # Forge Classic (a modules_forge/ folder) runs on the CPU with --always-cpu (it ignores --use-cpu and has no
    # --do-not-download-clip); its CLIP tokenizer ships in ldm_patched, so nothing else changes.
    forge = (webui_dir / "modules_forge").is_dir()
    cpu = ["--always-cpu"] if forge else ["--use-cpu", "all", "--do-not-download-clip"]
    command = [_python(webui_dir), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
               "--skip-python-version-check", *cpu, "--no-half", "--api", "--disable-nan-check",
               "--no-download-sd-model", "--data-dir", str(data), "--ckpt", str(ckpt),
               "--lora-dir", str(data / "models" / "Lora"), "--port", str(port), "--skip-version-check"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               COMMANDLINE_ARGS="", HF_HOME=str(hf_home))
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    log_path = tmp / "webui.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=webui_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.time()
        deadline = started + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the webui exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-6000:]}")
            log_text = log_path.read_text(errors="replace")
            if FATAL.search(log_text):  # e.g. a busy port: the launch failed, but the model-loading thread lives on
                pytest.fail(f"the webui failed to start:\n{log_text[-6000:]}")
            try:
                models = _call(base, "/sdapi/v1/sd-models", timeout=10)
                if models:
                    break
            except (AssertionError, urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.time() > deadline:
                pytest.fail(f"the webui did not start in {START_TIMEOUT_S:.0f} s:\n"
                            f"{log_path.read_text(errors='replace')[-6000:]}")
            time.sleep(3)
        print(f"\nwebui up in {time.time() - started:.0f} s")
        yield {"base": base, "data": data, "log": log_path, "tmp": tmp}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # our own process group (start_new_session)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)


# A traceback at the start of a line is one the webui did not catch; the errors it reports and survives are printed
# as "*** Error …" blocks with indented tracebacks (modules/errors.py).
FATAL = re.compile(r"^Traceback \(most recent call last\)", re.M)


def extension_errors(log_text: str) -> list[str]:
    """The webui's reported errors ("*** …" blocks) that involve LoRA Loop."""
    blocks = re.split(r"^(?=\*\*\* )", log_text, flags=re.M)
    return [b.strip()[:3000] for b in blocks if b.startswith("*** ") and "loraloop" in b.lower()
            and "Failed reading extension data from Git repository" not in b]


def _tab_components(config: dict) -> dict[str, dict]:
    return {c["props"]["elem_id"]: c for c in config.get("components", [])
            if isinstance(c.get("props", {}).get("elem_id"), str)}


def _txt2img(base: str, prompt: str) -> dict:
    import numpy as np
    from PIL import Image

    payload = {"prompt": prompt, "negative_prompt": "", "seed": 1234, "steps": 3, "width": 64, "height": 64,
               "cfg_scale": 5, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1}
    out = _call(base, "/sdapi/v1/txt2img", payload)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB"), dtype=np.int16)
    return {"pixels": pixels, "info": json.loads(out["info"])}


def test_train_in_the_real_webui_and_use_the_lora(webui_server):
    from loraloop.a1111 import widgets as form

    base, data = webui_server["base"], webui_server["data"]
    config = _call(base, "/config", timeout=60)
    components = _tab_components(config)
    assert components.get("tab_loraloop", {}).get("props", {}).get("label") == "LoRA Loop", \
        "the LoRA Loop tab was not built"
    for field in form.form_fields():  # every setting is a widget of the kind the form asks for
        widget = components.get(f"loraloop_{field.name}")
        assert widget is not None, field.name
        expected = {"bool": "checkbox", "choice": "dropdown", "int": "number", "float": "number"}.get(field.kind,
                                                                                                   "textbox")
        assert widget["type"] == expected, (field.name, widget["type"])
        if field.kind == "choice":
            choices = [c[0] if isinstance(c, (list, tuple)) else c for c in widget["props"]["choices"]]
            assert choices == list(field.choices) and widget["props"]["value"] == field.default, field.name

    t0 = time.time()
    before = _txt2img(base, "llstyle, a red square")
    t1 = time.time()
    assert before["pixels"].std() > 0, "the base image is flat (NaNs in the random model?)"
    dataset = _dataset(webui_server["tmp"] / "dataset")
    data_options = {"train_data_dir": str(dataset), "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 64}
    check = _call(base, "/loraloop/v1/check-dataset", {"config": data_options})
    assert check["will_fail"] is False and "4 usable" in check["report"], check
    result = _call(base, "/loraloop/v1/train", {
        "config": {**data_options, "max_train_steps": 3, "learning_rate": 0.05, "lr_scheduler": "constant",
                   "lora_rank": 4, "output_name": "ll_real", "trigger_word": "llstyle", "gradient_checkpointing": True,
                   "sample_steps": 2},
        "preferred_weight": 1.0, "make_preview": True}, timeout=3600)
    t2 = time.time()
    assert result["steps"] == 3 and result["name"] == "ll_real", result
    lora_dir = data / "models" / "Lora"
    assert {"ll_real.safetensors", "ll_real.json", "ll_real.preview.png"} <= {p.name for p in lora_dir.iterdir()}
    assert json.loads((lora_dir / "ll_real.json").read_text())["activation text"] == "llstyle"

    assert _call(base, "/loraloop/v1/status", timeout=60)["running"] is False
    listed = _call(base, "/sdapi/v1/loras", timeout=60)
    assert "ll_real" in [entry["name"] for entry in listed]  # the list was refreshed: no restart, no refresh click

    with_lora = _txt2img(base, "llstyle, a red square <lora:ll_real:1>")
    t3 = time.time()
    after = _txt2img(base, "llstyle, a red square")
    t4 = time.time()
    assert "ll_real" in with_lora["info"]["infotexts"][0], "the webui did not apply the LoRA (no 'Lora hashes')"
    delta = abs(with_lora["pixels"] - before["pixels"])
    print(f"txt2img {t1 - t0:.0f} s, train {t2 - t1:.0f} s (losses {result['losses']}), with LoRA {t3 - t2:.0f} s, "
          f"after {t4 - t3:.0f} s; mean |Δ| LoRA vs base {delta.mean():.2f}/255, "
          f"{(delta > 0).any(-1).mean():.0%} of pixels changed; base unchanged: "
          f"{bool((after['pixels'] == before['pixels']).all())}")
    assert delta.mean() > 0.5, "the LoRA did not change the image"
    assert (after["pixels"] == before["pixels"]).all(), \
        "the base model changed: training did not hand it back bit-identical"
    assert not extension_errors(webui_server["log"].read_text(errors="replace"))
    shutil.rmtree(webui_server["tmp"] / "dataset", ignore_errors=True)
