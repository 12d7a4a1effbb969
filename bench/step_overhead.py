"""Seconds per step of the engine's loop vs a bare hand-written peft forward/backward/step loop (issue #2 benchmark).

Same model, targets, rank, batch, latents, text conditioning and optimizer; CPU, fp32. The ratio is what our loop
(micro-batching, loss weighting, LR schedule, clipping, progress, NaN guard) costs on top of the arithmetic.

    python bench/step_overhead.py                 # tiny SD1-style model at 64 px
    python bench/step_overhead.py --full-sd15     # the full-size SD1.5 UNet (random weights) at 256 px
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from loraloop.cli.demo import DEMO_DIR
from loraloop.trainer.batches import dataset_options
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.data import TrainDataset
from loraloop.trainer.loop import train
from loraloop.trainer.network import network_spec
from loraloop.trainer.progress import NullSink
from loraloop.trainer.runner import prepare_batches


class Timer(NullSink):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def step(self, info) -> None:
        self.stamps.append(time.perf_counter())


def full_sd15_bundle():
    """The real SD1.5 UNet architecture with random weights, behind the tiny VAE and a 768-wide tiny text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraloop.trainer.bundles.tiny import build_tiny_bundle

    bundle = build_tiny_bundle("tiny-sd1")
    config = Path(__file__).resolve().parent.parent / "trainer/model_configs/sd1/unet"
    torch.manual_seed(0)
    bundle.unet = (
        UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config)).eval().requires_grad_(False)
    )
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77))
    bundle.text_encoders[0].module = te.eval().requires_grad_(False)
    from loraloop.trainer.naming import UNetLayout

    bundle._layout = UNetLayout.from_diffusers_config(bundle.unet.config)
    return bundle


def bare_loop(bundle, batches, config: TrainConfig, steps: int) -> list[float]:
    """The minimal loop: peft LoRA on the same targets, fixed batch, MSE on eps, AdamW."""
    from peft import LoraConfig, LoraModel

    from loraloop.trainer.schedule import add_noise

    targets = list(bundle.unet_targets(conv=False))
    tuner = LoraModel(bundle.unet, LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, target_modules=targets),
                      "default")
    params = [p for n, p in bundle.unet.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True)
    micro = batches.micro_batch(0, 0)
    cond = micro.conditioning(bundle, slice(None))
    ac = bundle.alphas_cumprod
    times = []
    gen = torch.Generator().manual_seed(0)
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            noise = torch.randn(micro.latents.shape, generator=gen)
            t = torch.randint(0, 1000, (micro.latents.shape[0],), generator=gen)
            pred = bundle.unet(add_noise(micro.latents, noise, t, ac), t, encoder_hidden_states=cond.context).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    finally:
        tuner.unload()
    return times


def measure(full: bool, steps: int, rounds: int) -> None:
    torch.set_num_threads(torch.get_num_threads())
    bundle = full_sd15_bundle() if full else __import__(
        "loraloop.trainer.bundles.tiny", fromlist=["x"]).build_tiny_bundle("tiny-sd1")
    res = 256 if full else 64
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(DEMO_DIR / "dataset", tmp / "data")
    for image in (tmp / "data").glob("*.png"):  # the demo images are 64 px: enlarge them to the bench resolution
        with Image.open(image) as im:
            im.resize((im.width * res // 64, im.height * res // 64), Image.Resampling.NEAREST).save(image)
    config = TrainConfig(train_data_dir=str(tmp / "data"), resolution=res, min_bucket_reso=res, max_bucket_reso=res,
                         bucket_reso_steps=res // 4, enable_bucket=False, batch_size=1, lora_rank=8,
                         max_train_steps=steps, lr_scheduler="constant", max_grad_norm=None,
                         learning_rate=1e-4).validate()
    dataset = TrainDataset.from_options(dataset_options(config), seed=0)
    batches = prepare_batches(bundle, dataset, config, NullSink())
    engine, bare = [], []
    for _ in range(rounds):  # interleave so drift in machine load hits both alike
        timer = Timer()
        start = time.perf_counter()
        train(bundle, batches, config, timer, spec=network_spec(config))
        stamps = [start, *timer.stamps]
        engine += [b - a for a, b in itertools.pairwise(stamps[1:])]  # drop the first (warm-up) step
        bare += bare_loop(bundle, batches, config, steps)[1:]
    e, b = statistics.median(engine), statistics.median(bare)
    name = "full-size SD1.5 UNet @256px" if full else "tiny-sd1 @64px"
    print(f"{name}: engine {e * 1000:.1f} ms/step, bare peft loop {b * 1000:.1f} ms/step, ratio {e / b:.3f} "
          f"({len(engine)} and {len(bare)} steps, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-sd15", action="store_true", help="full-size SD1.5 UNet architecture at 256 px")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    measure(args.full_sd15, args.steps or (6 if args.full_sd15 else 40), args.rounds)
