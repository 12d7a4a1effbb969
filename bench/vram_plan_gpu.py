"""GPU check of the memory planner: full-size random-weight SD1.5 at 512, SDXL at 1024 and Flux.1 dev at 1024 under
memory budgets.

For each family and each budget (4, 6, 8, 12, 24 GB, enforced with `torch.cuda.set_per_process_memory_fraction`):
plan with every plannable key on auto and the effective batch 2, cache latents/text with the UNet off the GPU, move
the encoders off, train `--steps` steps through the real loop with `OomRecovery` around each step, and print the
predicted vs measured peak (`torch.cuda.max_memory_allocated`) and seconds per step. At the end it asserts that no
OOM happened (not even a recovered one), that the issue's targets fit (SD1.5 512 in 4 GB, SDXL 1024 in 8 GB), and
reports every estimate off by more than 10%.

Run (one shot, about 3-5 minutes on an H100; needs diffusers and peft importable, e.g. `pip install --no-index
--find-links wheels/ diffusers peft` with wheels carried along):

    python bench/vram_plan_gpu.py [--families sd1 sdxl] [--budgets 4 6 8 12 24] [--steps 6] [--json $OUT/plan.json]

Flux.1 (`--families flux1`, 11.9 B parameters, bf16 and `--fp8` weights) runs the transformer alone: T5/CLIP outputs
and latents are random tensors of the real shapes (the encoders are cached before training in every real run, so
they are not part of the training peak). The planner may swap blocks (`blocks_to_swap: auto`); the swapped blocks stay
in pinned host memory and stream in (trainer/blockswap.py). Flux budgets: 8, 12, 16, 24 GB; the targets: 8 GB fits.

`--smoke` runs the same code on the CPU with the tiny built-in models (no budgets enforced) to check the script; for
flux1 it forces 2 swapped blocks so the swap path runs too.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from loraloop.trainer import loop
from loraloop.trainer.batches import BatchMaker, dataset_options
from loraloop.trainer.blockswap import place_unswapped
from loraloop.trainer.bundle import Conditioning
from loraloop.trainer.bundles.diffusers_bundle import DiffusersBundle
from loraloop.trainer.bundles.flow_bundle import FlowBundle
from loraloop.trainer.config import PLANNABLE, TrainConfig
from loraloop.trainer.data import LatentCache, TrainDataset
from loraloop.trainer.families import get_family
from loraloop.trainer.fp8 import store_fp8
from loraloop.trainer.memory import GIB, DatasetFacts, ModelInfo, OomRecovery, PlanRequest, current_device, make_plan
from loraloop.trainer.metadata import RunInfo

RESOLUTION = {"sd1": 512, "sdxl": 1024, "flux1": 1024}
RANK = {"sd1": 8, "sdxl": 8, "flux1": 16}
MUST_FIT = {"sd1": 4, "sdxl": 8, "flux1": 8, "flux1-fp8": 8}  # the issues' targets: smallest budget (GB) that fits
BUDGETS = {"sd1": [4, 6, 8, 12, 24], "sdxl": [4, 6, 8, 12, 24], "flux1": [8, 12, 16, 24]}
FP8_BUDGETS = {"flux1": [8, 12]}  # then the same weights stored in fp8 (trainer/fp8.py)
DIT_FAMILIES = ("flux1",)
EFFECTIVE_BATCH = 2
TOLERANCE = 0.10


class RandomBundle(DiffusersBundle):
    """A diffusers bundle with random weights and no tokenizer: captions become fixed token ids."""

    @staticmethod
    def _token_ids(tokenizer, captions, module=None):
        device = next(module.parameters()).device if module is not None else "cpu"
        return torch.full((len(captions), 77), 320, dtype=torch.long, device=device)


def build_random(family: str, dtype: torch.dtype, device: str) -> RandomBundle:
    """Full-size modules from the shipped configs, initialised on `device` (fast on a GPU), frozen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraloop.trainer.memory.estimation.architecture import family_config_dir
    from loraloop.trainer.schedule import scaled_linear_alphas_cumprod

    folder = family_config_dir(family)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).to(dtype)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))).to(dtype)]
        if family == "sdxl":
            config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
            tes.append(CLIPTextModelWithProjection(config).to(dtype))
    for module in (unet, vae, *tes):
        module.eval().requires_grad_(False)
    return RandomBundle(get_family(family), unet, vae, tes, [None] * len(tes), scaled_linear_alphas_cumprod(),
                        f"random-{family}")


class RandomFlowBundle(FlowBundle):
    """A diffusers Flux transformer with random weights; text conditioning and latents are random tensors of the real
    shapes (T5-XXL 512×4096, CLIP-L pooled 768, 16-channel latents)."""

    def __init__(self, transformer: torch.nn.Module, name: str) -> None:
        from types import SimpleNamespace

        from loraloop.trainer.bundles.flux import FluxArchitecture

        vae = torch.nn.Linear(1, 1)
        vae.config = SimpleNamespace(scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16)
        super().__init__(get_family("flux1"), FluxArchitecture(), transformer, vae, [], [], name)
        self.text_width = int(transformer.config.joint_attention_dim)
        self.pooled_width = int(transformer.config.pooled_projection_dim)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        return torch.randn(b, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(b * h + w)).to(self.device)

    def encode_text(self, captions: list[str]) -> Conditioning:
        gen = torch.Generator().manual_seed(len(captions))
        context = torch.randn(len(captions), 512, self.text_width, generator=gen)
        pooled = torch.randn(len(captions), self.pooled_width, generator=gen)
        return Conditioning(context.to(self.device, self.dtype), pooled.to(self.device, self.dtype))


def build_random_flux(dtype: torch.dtype, smoke: bool) -> RandomFlowBundle:
    """Flux.1 dev at its released size (diffusers' defaults are its config), initialised on the GPU (fast) and kept in
    CPU memory between budgets; `smoke`: 2 double + 3 single blocks on the CPU."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    if smoke:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    else:
        with torch.device("cuda"):
            transformer = FluxTransformer2DModel(guidance_embeds=True).to(dtype)
        transformer.to("cpu")
        release()
    transformer.eval().requires_grad_(False)
    return RandomFlowBundle(transformer, "random-flux1" if not smoke else "tiny-random-flux1")


def tiny(family: str) -> DiffusersBundle:
    from loraloop.trainer.bundles.tiny import build_tiny_bundle

    return build_tiny_bundle("tiny-sdxl" if family == "sdxl" else "tiny-sd1")


def make_dataset(folder: Path, resolution: int, count: int = 4) -> Path:
    rng = np.random.default_rng(0)
    lines = ["filename,prompt"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,a photo number {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def move(modules: list[torch.nn.Module], device: str) -> None:
    for module in modules:
        module.to(device)
    release()


def run_budget(family: str, bundle: DiffusersBundle | FlowBundle, info: ModelInfo, data: Path, budget_gb: float,
               steps: int, device: str, smoke: bool, weight_bytes: float | None = None) -> dict:
    resolution = 64 if smoke else RESOLUTION[family]
    dit = family in DIT_FAMILIES
    weights = "fp8" if weight_bytes == 1 else "bf16"
    row: dict = {"family": family if weights == "bf16" else f"{family}-fp8", "budget_gb": budget_gb,
                 "resolution": resolution}
    budget = int(budget_gb * GIB)
    # Flux: one image per step as its users train it (effective batch 2 is the SD rows' setting).
    config = TrainConfig(family=family, train_data_dir=str(data), metadata_path=str(data / "metadata.csv"),
                         resolution=resolution, enable_bucket=False, min_bucket_reso=min(256, resolution),
                         batch_size=1 if dit else EFFECTIVE_BATCH, lora_rank=RANK[family], max_train_steps=steps,
                         lr_scheduler="constant", learning_rate=1e-5, seed=0).validate()
    dataset = TrainDataset.from_options(dataset_options(config), seed=0)
    spec = current_device(device)
    auto = frozenset(PLANNABLE) - ({"blocks_to_swap"} if smoke and dit else set())
    if smoke and dit:
        config = replace(config, blocks_to_swap=2, gradient_checkpointing=True)
    plan = make_plan(config, PlanRequest(info, spec, budget, auto, DatasetFacts.from_dataset(dataset),
                                         weight_bytes=weight_bytes))
    row.update(fits=plan.fits, plan=plan.to_dict(), blocks_to_swap=plan.shape.blocks_to_swap)
    print(f"\n=== {row['family']} {resolution}px, budget {budget_gb} GB on {spec.name} ===")
    for line in plan.lines():
        print("  " + line)
    if not plan.fits:
        return row
    config = plan.apply(config)
    dataset = TrainDataset.from_options(dataset_options(config), seed=0)
    encoders = [] if dit else [bundle.vae, *(s.module for s in bundle.text_encoders)]
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(0).total_memory))
        move([bundle.unet], "cpu")  # cache first, without the UNet (what the runner should do)
        move(encoders, "cuda")
        if dit:  # the random "encoders" make tensors on the transformer's device: put its non-block parts there
            place_unswapped(bundle.unet, "cuda", len(bundle.unet.transformer_blocks) +
                            len(bundle.unet.single_transformer_blocks))
        torch.cuda.reset_peak_memory_stats()
    # What the runner should do: cache one image at a time before the UNet is on the GPU, then offload the encoders.
    cache = LatentCache(bundle.encode_images, encoder_id=bundle.name, options=dataset.options)
    cache.prepare(dataset, batch_size=plan.shape.cache_batch_size)
    batches = BatchMaker(bundle, dataset, config, latent_cache=cache, cache_text=dataset.captions_are_static)
    if device == "cuda":
        row["cache_peak_gb"] = torch.cuda.max_memory_allocated() / GIB
        row["predicted_cache_gb"] = plan.memory.phases.get("cache", 0) / GIB
        move(encoders, "cpu")
        if dit:  # what the runner does: the swapped blocks never enter the device whole
            place_unswapped(bundle.unet, "cuda", plan.shape.blocks_to_swap)
            release()
        else:
            move([bundle.unet], "cuda")
        torch.cuda.reset_peak_memory_stats()
    batches.chunk_size = plan.chunk_size
    run = RunInfo(model_name=bundle.name)
    recovery = OomRecovery(bundle, batches, config, run=run, spill_guard=None)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, network: object) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    try:
        loop.train(bundle, batches, config, run=run, on_step_end=tick, recovery=recovery)
        row["status"] = "ok"
    except Exception as error:
        row["status"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    row["adjustments"] = [a.message for a in recovery.adjustments]
    row["predicted_gb"] = plan.memory.peak / GIB
    row["predicted_train_gb"] = (max(plan.memory.phases["train"], plan.memory.phases["optimizer"])
                                 + plan.memory.parts["workspace"]) / GIB
    row["predicted_s"] = plan.time.seconds_per_step
    if device == "cuda":
        row["measured_gb"] = torch.cuda.max_memory_allocated() / GIB
        row["reserved_gb"] = torch.cuda.max_memory_reserved() / GIB
        torch.cuda.set_per_process_memory_fraction(1.0)
    row["measured_s"] = statistics.median(times[1:]) if len(times) > 1 else None
    print(f"  -> {row['status']}; adjustments: {row['adjustments'] or 'none'}")
    if "measured_gb" in row:
        err = (row["predicted_train_gb"] - row["measured_gb"]) / row["measured_gb"]
        row["error"] = err
        print(f"  -> peak predicted {row['predicted_train_gb']:.2f} GB (train phase; plan peak "
              f"{row['predicted_gb']:.2f}), measured {row['measured_gb']:.2f} GB allocated / "
              f"{row['reserved_gb']:.2f} GB reserved ({err:+.1%}); cache phase {row['cache_peak_gb']:.2f} GB "
              f"(predicted {row['predicted_cache_gb']:.2f})")
    if row["measured_s"]:
        print(f"  -> s/step predicted {row['predicted_s']:.3f}, measured {row['measured_s']:.3f} "
              f"(×{row['measured_s'] / row['predicted_s']:.2f})")
    del batches, dataset
    release()
    return row


def _fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if row.get(key) is not None else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["sd1", "sdxl"])
    parser.add_argument("--budgets", nargs="+", type=float, help="GB (default: per family, BUDGETS)")
    parser.add_argument("--fp8-budgets", nargs="*", type=float, help="GB for fp8 weights (default: FP8_BUDGETS)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models: check the script itself")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to check the script on the CPU")
        return 2
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            t0 = time.perf_counter()
            if family in DIT_FAMILIES:
                bundle = build_random_flux(torch.bfloat16, args.smoke)
            else:
                bundle = tiny(family) if args.smoke else build_random(family, torch.bfloat16, "cuda")
            info = ModelInfo.for_bundle(bundle) if args.smoke else ModelInfo.for_family(family)
            folder = Path(tmp) / family
            folder.mkdir()
            data = make_dataset(folder, 64 if args.smoke else RESOLUTION[family])
            print(f"built {family} in {time.perf_counter() - t0:.1f}s")
            runs = [(b, None) for b in (args.budgets or BUDGETS[family])]
            fp8 = FP8_BUDGETS.get(family, []) if args.fp8_budgets is None else args.fp8_budgets
            runs += [(b, 1.0) for b in (fp8 if family in DIT_FAMILIES else [])]
            in_fp8 = False
            for budget, weight_bytes in runs:
                if weight_bytes == 1.0 and not in_fp8:
                    store_fp8(bundle.unet, list(bundle.unet_targets(conv=False)))  # the rest of the runs are fp8
                    in_fp8 = True
                try:
                    rows.append(run_budget(family, bundle, info, data, budget, args.steps, device, args.smoke,
                                           weight_bytes))
                except Exception as error:
                    traceback.print_exc()
                    rows.append({"family": family, "budget_gb": budget, "status": f"crashed: {error}"})
            del bundle
            release()
    print(f"\n{'family':<10}{'GB':>5} {'fits':>5} {'pred GB':>8} {'meas GB':>8} {'err':>7} {'pred s':>7} {'meas s':>7}"
          f"  status")
    for r in rows:
        print(f"{r['family']:<10}{r['budget_gb']:>5g} {r.get('fits', '-')!s:>5} "
              f"{_fmt(r, 'predicted_train_gb', '8.2f')} "
              f"{_fmt(r, 'measured_gb', '8.2f')} {_fmt(r, 'error', '+7.1%')} {_fmt(r, 'predicted_s', '7.3f')} "
              f"{_fmt(r, 'measured_s', '7.3f')}  {r.get('status', '-')}")
    print(f"total {time.perf_counter() - start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    failures = []
    for r in rows:
        if r.get("status", "ok") != "ok" and r.get("fits", True):
            failures.append(f"{r['family']} {r['budget_gb']} GB: {r.get('status')}")
        if r.get("adjustments"):
            failures.append(f"{r['family']} {r['budget_gb']} GB needed the OOM ladder: {r['adjustments']}")
        if not args.smoke and r["budget_gb"] >= MUST_FIT.get(r["family"], 0) and not r.get("fits"):
            failures.append(f"{r['family']} {r['budget_gb']} GB: the planner found no plan")
        if r.get("error") is not None and abs(r["error"]) > TOLERANCE:
            print(f"NOTE: {r['family']} {r['budget_gb']} GB estimate off by {r['error']:+.1%} (target ±10%)")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("OK: no OOM, targets fit" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
