"""The memory estimator: the meta-device tracer, estimate vs measured peaks on CPU, the shipped full-size profiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loraloop.trainer.batches import dataset_options
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.data import TrainDataset
from loraloop.trainer.loop import train
from loraloop.trainer.memory import GIB, ModelInfo, RunShape
from loraloop.trainer.memory.estimation.architecture import count_family_sizes, family_sizes, meta_bundle
from loraloop.trainer.memory.estimation.devices import DEVICES, cpu_device
from loraloop.trainer.memory.estimation.estimate import estimate_memory, estimate_time
from loraloop.trainer.memory.estimation.probe import measure
from loraloop.trainer.memory.estimation.profiles import TRACE_RANK, family_profile, load_shipped, trace_sides
from loraloop.trainer.memory.estimation.simulate import StepSetup, simulate_step
from loraloop.trainer.memory.estimation.tracer import LiveBytes
from loraloop.trainer.network import NetworkSpec
from loraloop.trainer.progress import NullSink
from loraloop.trainer.runner import prepare_batches

# Stated accuracy of the estimate against the CPU allocator's measured peak (see the measurements in the report).
ERROR_PLAIN = 0.02  # without gradient checkpointing
ERROR_CHECKPOINTED = 0.10  # with it (the recompute frees in a slightly different order than the trace)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_dataset(folder, size: int, count: int = 4):
    rng = np.random.default_rng(0)
    lines = ["filename,prompt"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,a photo number {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def mid_bundle():
    """An SD1-layout model of ~20M parameters: big enough that activations dominate, small enough for a CPU test."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraloop.trainer.bundles.diffusers_bundle import DiffusersBundle
    from loraloop.trainer.bundles.tiny import _vae
    from loraloop.trainer.families import get_family
    from loraloop.trainer.schedule import scaled_linear_alphas_cumprod
    from loraloop.trainer.tokenizer import load_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(block_out_channels=(64, 128, 256), layers_per_block=1, cross_attention_dim=128,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    attention_head_dim=8, norm_num_groups=32, sample_size=32)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                          num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                          projection_dim=128))
        vae = _vae()
    for m in (unet, te, vae):
        m.eval().requires_grad_(False)
    return DiffusersBundle(get_family("sd1"), unet, vae, [te], [load_clip_tokenizer("clip-l")],
                           scaled_linear_alphas_cumprod(), "mid-sd1")


class TestLiveBytes:
    def test_counts_saved_tensors_and_frees_the_rest(self):
        """A saved input stays counted after forward, an unused output is freed, grads remain after backward."""
        w = torch.randn(1000, device="meta", requires_grad=True)
        with LiveBytes() as live:
            y = (w * 2).sin()  # sin saves its input (w * 2), not its output
            z = y.sum()
            del y
            assert live.live == 4000 + 4
            z.backward()
            del z
        assert live.live == 4000  # w.grad
        assert live.peak == 3 * 4000 + 8  # in backward: saved input, cos(input), grad product; loss + its grad

    def test_existing_storages_are_never_counted(self):
        """In-place updates of tensors made outside (weights) add nothing."""
        w = torch.zeros(1000, device="meta")
        with LiveBytes() as live:
            w.add_(1.0)
        assert live.peak == 0


def measured_and_estimated(bundle, tmp_path, *, resolution, batch, gc):
    data = random_dataset(tmp_path, resolution)
    config = TrainConfig(train_data_dir=str(data), metadata_path=str(data / "metadata.csv"), resolution=resolution,
                         enable_bucket=False, min_bucket_reso=min(256, resolution), batch_size=batch, lora_rank=8,
                         max_train_steps=2, gradient_checkpointing=gc, seed=1).validate()
    batches = prepare_batches(bundle, TrainDataset.from_options(dataset_options(config), seed=1), config, NullSink())
    _, measured = measure(lambda: train(bundle, batches, config), "cpu")
    info = ModelInfo.for_bundle(bundle)
    shape = RunShape.from_config(config, "sd1", weights_resident=True, mixed_precision="no")
    estimate = estimate_memory(info, shape, cpu_device())
    return measured.peak_bytes, estimate.peak


class TestEstimateVsMeasured:
    @pytest.mark.parametrize(("name", "resolution", "batch", "gc", "error"), [
        ("tiny-sd1", 64, 2, False, ERROR_PLAIN),
        ("tiny-sd1", 64, 2, True, ERROR_CHECKPOINTED),
        ("tiny-sdxl", 64, 2, False, ERROR_PLAIN),
    ])
    def test_tiny_models(self, name, resolution, batch, gc, error, tmp_path):
        """Adapter + optimizer + activations of two real CPU steps match the traced estimate."""
        from loraloop.trainer.bundles.tiny import build_tiny_bundle

        measured, estimated = measured_and_estimated(build_tiny_bundle(name), tmp_path, resolution=resolution,
                                                     batch=batch, gc=gc)
        assert abs(estimated - measured) <= error * measured, (measured, estimated)

    @pytest.mark.parametrize(("gc", "error"), [(False, ERROR_PLAIN), (True, ERROR_CHECKPOINTED)])
    def test_mid_size_model(self, gc, error, tmp_path):
        """A ~20M-parameter SD1-layout UNet at 192 px: tens of MB of activations, estimated within the stated error."""
        measured, estimated = measured_and_estimated(mid_bundle(), tmp_path, resolution=192, batch=2, gc=gc)
        assert measured > 20 * 2**20
        assert abs(estimated - measured) <= error * measured, (measured, estimated)


class TestFullSizeArchitectures:
    def test_parameter_counts_from_shipped_configs(self):
        """Meta-device counts equal the published sizes of SD1.5 (860M UNet, 123M CLIP-L) and SDXL (2.57B), and the
        counts shipped beside the profiles."""
        sd1, sdxl = count_family_sizes("sd1"), count_family_sizes("sdxl")
        assert (sd1, sdxl) == (family_sizes("sd1"), family_sizes("sdxl"))
        assert sd1.unet == 859_520_964 and sd1.text_encoders == (123_060_480,)
        assert sdxl.unet == 2_567_463_684 and len(sdxl.text_encoders) == 2
        assert sdxl.unet_linear_per_rank * 8 == pytest.approx(21.3e6, rel=0.01)  # SDXL rank-8 LoRA ≈ 21M params

    def test_shipped_profile_matches_a_fresh_trace(self):
        """The shipped SD1 table reproduces a new trace exactly (regenerate it when this fails)."""
        shipped = load_shipped()
        assert {"sd1", "sd2", "sdxl"} <= set(shipped)
        bundle = meta_bundle("sd1")
        side = trace_sides(64)[1]
        trace = simulate_step(bundle, NetworkSpec(rank=TRACE_RANK, alpha=TRACE_RANK),
                              StepSetup(1, (side, side), torch.float16, False, "flash"))
        model = shipped["sd1"].step("half", False, "flash")
        assert model.peak(1, side * side) == pytest.approx(trace.peak, rel=1e-3)
        assert model.flops(side * side) == pytest.approx(trace.flops, rel=1e-3)


class TestDiTFamilies:
    """The flow families' closed-form model (memory/estimation/dit.py): released sizes, and the levers' directions."""

    FLOW = ("flux1", "flux1-schnell", "chroma", "sd3", "zimage", "lumina2", "qwen-image")

    def test_released_sizes_and_the_flux_rank_16_lora(self):
        infos = {f: ModelInfo.for_family(f) for f in self.FLOW}
        assert infos["flux1"].sizes.unet == 11_900_000_000 and infos["qwen-image"].sizes.unet == 20_400_000_000
        # kohya's Flux.1 rank-16 LoRA of every double/single-block Linear holds 76.6M parameters (≈ 153 MB in fp16).
        assert infos["flux1"].sizes.adapter_params(16) == pytest.approx(76.6e6, rel=0.01)
        assert all(info.family.is_flow for info in infos.values())

    def test_flux_1024_peak_and_what_each_lever_changes(self):
        info, device = ModelInfo.for_family("flux1"), DEVICES["rtx 4090"]
        base = RunShape("flux1", (1024, 1024), lora_rank=16, gradient_checkpointing=True, mixed_precision="bf16")
        peak = estimate_memory(info, base, device)
        assert peak.parts["weights_unet"] == 2 * 11_900_000_000
        assert 23 * GIB < peak.peak < 30 * GIB  # bf16 weights alone are 22.2 GiB: kohya needs fp8 for 24 GB
        no_gc = estimate_memory(info, RunShape("flux1", (1024, 1024), lora_rank=16, mixed_precision="bf16"), device)
        assert no_gc.parts["activations"] > 10 * peak.parts["activations"]
        smaller = estimate_memory(info, RunShape("flux1", (512, 512), lora_rank=16, gradient_checkpointing=True,
                                                 mixed_precision="bf16"), device)
        assert smaller.parts["activations"] < 0.35 * peak.parts["activations"]
        seconds = estimate_time(info, base, device).seconds_per_step
        assert 1.0 < seconds < 10.0  # kohya reports ~2-4 s/step for Flux LoRA at 1024 on a 4090 (fp8)
        # A host holding the weights in fp8 (ComfyUI's fp8_e4m3fn / fp8_scaled): one byte each, nothing upcast.
        fp8 = estimate_memory(info, RunShape("flux1", (1024, 1024), lora_rank=16, gradient_checkpointing=True,
                                             mixed_precision="bf16", weight_bytes=1), device)
        assert fp8.parts["weights_unet"] == 11_900_000_000 and fp8.peak < 16 * GIB


class TestPublishedNumbers:
    """Sanity against docs/landscape.md §3: the model must agree with what users report."""

    def shape(self, family, resolution, **kw):
        return RunShape(family, (resolution, resolution), mixed_precision="fp16", **kw)

    def test_sd15_512_fits_4_gb(self):
        """SD1.5 512 LoRA (rank 8, cached latents/text) needs well under 4 GB with checkpointing."""
        info = ModelInfo.for_family("sd1")
        peak = estimate_memory(info, self.shape("sd1", 512, gradient_checkpointing=True), DEVICES["rtx 3060"]).peak
        assert peak < 3.2 * GIB

    def test_sdxl_1024_fits_8_gb(self):
        """sd-scripts' claim: SDXL LoRA in 8 GB with checkpointing, cached text/latents, rank 4-8."""
        info = ModelInfo.for_family("sdxl")
        peak = estimate_memory(info, self.shape("sdxl", 1024, gradient_checkpointing=True), DEVICES["rtx 3070"]).peak
        assert 5.3 * GIB < peak < 7.2 * GIB

    def test_sdxl_1024_without_checkpointing_is_big(self):
        """A 4090 run without checkpointing is reported at ~19 GB with resident text encoders."""
        info = ModelInfo.for_family("sdxl")
        shape = self.shape("sdxl", 1024, offload_encoders=False, cache_text=False)
        peak = estimate_memory(info, shape, DEVICES["rtx 4090"]).peak
        assert 14 * GIB < peak < 21 * GIB

    @pytest.mark.parametrize(("device", "family", "resolution", "low", "high"), [
        ("rtx 4090", "sdxl", 1024, 0.9, 1.6),  # 1.1-1.35 s/it
        ("rtx 3090 ti", "sdxl", 1024, 0.9, 1.6),  # 1.12-1.23 s/it
        ("rtx 3060", "sdxl", 1024, 2.0, 3.3),  # 2.4-2.8 s/it
        ("rtx 3070 ti", "sd1", 512, 0.2, 0.5),  # ~3 it/s
    ])
    def test_step_time_matches_reports(self, device, family, resolution, low, high):
        info = ModelInfo.for_family(family)
        seconds = estimate_time(info, self.shape(family, resolution), DEVICES[device]).seconds_per_step
        assert low <= seconds <= high, seconds

    def test_family_profile_is_shipped(self):
        """Full-size profiles load from the table (no minutes-long trace at plan time)."""
        assert family_profile("sd2-v").name == "sd2"


class TestProbe:
    def test_probe_calibrates_against_a_real_run(self, tmp_path):
        """Two real CPU steps: the measured peak is within the stated error of the estimate (scale ≈ 1)."""
        from loraloop.trainer.bundles.tiny import build_tiny_bundle
        from loraloop.trainer.memory.planning.autoplan import plan_for_config, probe

        bundle = build_tiny_bundle("tiny-sd1")
        data = random_dataset(tmp_path, 64)
        config = TrainConfig(train_data_dir=str(data), metadata_path=str(data / "metadata.csv"), resolution=64,
                             enable_bucket=False, min_bucket_reso=64, batch_size=2, lora_rank=8, max_train_steps=4,
                             seed=1).validate()
        dataset = TrainDataset.from_options(dataset_options(config), seed=1)
        batches = prepare_batches(bundle, dataset, config, NullSink())
        plan = plan_for_config(config, bundle=bundle, dataset=dataset, free=2**30, auto=frozenset())
        result = probe(config, plan, bundle, batches)
        assert result.measured.peak_bytes > 0 and result.predicted_seconds > 0
        assert abs(result.measured.peak_bytes - result.predicted_bytes) <= ERROR_PLAIN * result.measured.peak_bytes
        assert result.memory_scale == pytest.approx(1.0, abs=0.05)
