"""Long runs: periodic saves (keep last K), sample previews, cancel saves progress, atomic writes survive a kill."""

import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from test_loop import StopAfter, config_for

from loraloop.trainer.errors import TrainingInterrupted
from loraloop.trainer.progress import NullSink
from loraloop.trainer.runner import run


class Previews(NullSink):
    def __init__(self):
        self.images = []

    def preview(self, step, image):
        self.images.append((step, image.size))

def test_periodic_saves_keep_last_and_previews(tiny_sd1, demo_dataset, tmp_path):
    config = config_for(demo_dataset, max_train_steps=6, save_every_n_steps=2, save_last_n=2,
                        output_dir=str(tmp_path / "out"), output_name="run", sample_prompts=["a red circle"],
                        sample_every_n_steps=3, sample_steps=2)
    sink = Previews()
    outputs = run(config, sink, bundle=tiny_sd1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("run-step*.safetensors")) == ["run-step000004.safetensors",
                                                                        "run-step000006.safetensors"]
    assert [s for s, _ in sink.images] == [3, 6]
    assert (out / "samples" / "run_step000003.png").is_file()
    assert outputs.samples is not None and outputs.samples.is_file()
    with safe_open(str(out / "run-step000004.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "4"
    with safe_open(str(outputs.lora), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_steps"] == "6" and '"lora_rank": 4' in meta["loraloop_config"]
    assert (out / "run.yaml").read_text().startswith("base_model: builtin:tiny-sd1")

def test_cancel_saves_what_was_trained(tiny_sd1, demo_dataset, tmp_path):
    config = config_for(demo_dataset, max_train_steps=10, output_dir=str(tmp_path), output_name="c")
    with pytest.raises(TrainingInterrupted):
        run(config, StopAfter(3), bundle=tiny_sd1)
    saved = tmp_path / "c-cancelled-step000003.safetensors"
    assert saved.is_file() and not (tmp_path / "c.safetensors").exists()

class HostInterrupt(BaseException):
    """Stands in for ComfyUI 0.33's InterruptProcessingException (a BaseException raised inside an op's forward)."""


class HostCancelSink(NullSink):
    interrupt_errors = (HostInterrupt,)


def test_host_interrupt_inside_a_forward_saves_the_last_completed_step(tiny_sd1, demo_dataset, tmp_path):
    config = config_for(demo_dataset, max_train_steps=10, accumulation_steps=1, gradient_checkpointing=False,
                        output_dir=str(tmp_path), output_name="h")
    calls = []

    def interrupt_third_forward(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise HostInterrupt

    handle = tiny_sd1.unet.register_forward_pre_hook(interrupt_third_forward)
    try:
        with pytest.raises(TrainingInterrupted) as info:
            run(config, HostCancelSink(), bundle=tiny_sd1, samples=False)
    finally:
        handle.remove()
    assert isinstance(info.value.__cause__, HostInterrupt) and info.value.step == 2
    saved = tmp_path / "h-cancelled-step000002.safetensors"
    assert info.value.saved == saved and not (tmp_path / "h.safetensors").exists()
    with safe_open(str(saved), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "2"


def test_an_interrupt_the_sink_does_not_claim_is_not_a_cancel(tiny_sd1, demo_dataset, tmp_path):
    config = config_for(demo_dataset, max_train_steps=4, output_dir=str(tmp_path), output_name="x")

    def interrupt(module, args):
        raise HostInterrupt

    handle = tiny_sd1.unet.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(HostInterrupt):
            run(config, NullSink(), bundle=tiny_sd1, samples=False)
    finally:
        handle.remove()
    assert not list(tmp_path.glob("*.safetensors"))


def test_resume_from_cli_continues(demo_dataset, tmp_path):
    """`loraloop train --resume` continues a run's saved state to a longer schedule."""
    from loraloop.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        train_data_dir: {demo_dataset}
        resolution: 64
        min_bucket_reso: 32
        max_bucket_reso: 128
        bucket_reso_steps: 32
        max_train_steps: 3
        lr_scheduler: constant
        output_dir: {tmp_path / 'out'}
        output_name: r
        """))
    assert main(["train", "--config", str(cfg)]) == 0
    state = tmp_path / "out" / "r-state.pt"
    assert main(["train", "--config", str(cfg), "--resume", str(state), "--set", "lora_rank=16"]) == 2  # refused
    assert main(["train", "--config", str(cfg), "--resume", str(state), "--set", "max_train_steps=5"]) == 0
    with safe_open(str(tmp_path / "out" / "r.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "5"

KILL_DURING_SAVE = """
import os, signal, sys, torch
import safetensors.torch as st
from loraloop.trainer.lorafile import save_lora

real = st.save_file
def half_then_die(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as fh:   # leave a truncated temp file behind, then die mid-save
        fh.truncate(100)
    os.kill(os.getpid(), signal.SIGKILL)
st.save_file = half_then_die
save_lora(sys.argv[1], {"a": torch.ones(1000)}, {"k": "new"}, overwrite=True)
"""

def test_kill_during_save_leaves_previous_file_intact(tmp_path):
    from loraloop.trainer.lorafile import load_lora, save_lora

    target = tmp_path / "lora.safetensors"
    save_lora(target, {"a": torch.zeros(10)}, {"k": "old"})
    before = target.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(target)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    tensors, meta = load_lora(target)
    assert meta == {"k": "old"} and torch.equal(tensors["a"], torch.zeros(10))

def test_nan_tensors_are_never_written(tmp_path):
    from loraloop.trainer.errors import LoraFileError
    from loraloop.trainer.lorafile import save_lora

    with pytest.raises(LoraFileError, match="tensor 'bad' contains NaN or inf"):
        save_lora(tmp_path / "x.safetensors", {"bad": torch.tensor([1.0, float("nan")])}, {})
    assert not any(tmp_path.iterdir())



def test_a_run_that_cannot_fit_stops_before_loading_with_advice(demo_dataset, tmp_path):
    """With a memory budget the planner runs first: too little memory is a clear error, not a CUDA OOM later."""
    from loraloop.trainer.errors import ConfigError

    config = config_for(demo_dataset, base_model=str(tmp_path / "never-loaded.safetensors"), family="sdxl",
                        vram_budget_gb=2.0, resolution=1024, min_bucket_reso=32, max_bucket_reso=2048,
                        bucket_reso_steps=32, output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"does not fit in the free accelerator memory.*needs"):
        run(config)
    assert not (tmp_path / "out").exists()


def test_auto_keys_in_yaml(tmp_path):
    from loraloop.trainer.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: auto\ngradient_checkpointing: true\n")
    config = load_config(path)
    assert "lora_rank" in config.auto and "gradient_checkpointing" not in config.auto


def test_apply_plan_rebuilds_the_dataset_when_the_plan_changes_its_buckets(demo_dataset):
    """One post-plan step for the CLI, ComfyUI and A1111: a plan that caps the largest bucket (resolution unchanged)
    rebuilds the dataset, through the host's own builder when one is given."""
    from dataclasses import replace as _replace

    from loraloop.trainer.batches import dataset_options
    from loraloop.trainer.config import TrainConfig
    from loraloop.trainer.data import TrainDataset
    from loraloop.trainer.runner import apply_plan

    config = TrainConfig(train_data_dir=str(demo_dataset), resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                         bucket_reso_steps=32).validate()
    dataset = TrainDataset.from_options(dataset_options(config), seed=0)

    class Plan:
        def __init__(self, **changes):
            self.changes = changes

        def apply(self, cfg):
            return _replace(cfg, **self.changes)

    built = []
    same, kept = apply_plan(Plan(), config, dataset, rebuild=lambda cfg: built.append(cfg))
    assert kept is dataset and same == config and built == []
    capped, rebuilt = apply_plan(Plan(max_bucket_reso=64), config, dataset)
    assert capped.max_bucket_reso == 64 and rebuilt is not dataset and rebuilt.options.max_bucket_reso == 64
    apply_plan(Plan(max_bucket_reso=64), config, dataset, rebuild=lambda cfg: built.append(cfg) or dataset)
    assert [c.max_bucket_reso for c in built] == [64]
