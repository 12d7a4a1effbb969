"""Build the demo base model (`builtin:demo-base`) from nothing: `python -m loraloop.cli.demo.build_base`.

Everything it learns from is drawn by `scenes.py`, so the build needs no download and is reproducible from the seed:

1. text encoder: the tiny CLIP of `trainer/bundles/tiny.py`, from seeded random weights, trained with the UNet (3.).
2. VAE: `ThumbnailVAE` (trainer/bundles/demo.py; 4 latent channels at 1/8 of the image, three of them fixed block
   means): its detail channel and decoder learn to reconstruct `vae_scene`s (L1 + MSE, slightly noisy latents); its
   `scaling_factor` makes the latents of base scenes unit-variance, as SD's 0.18215 does.
3. UNet: an SD1-style `UNet2DConditionModel` trained on the latents of captioned `base_scene`s with v prediction
   on SD's scaled-linear schedule (what the engine trains LoRAs with), min-SNR-5 weighting, 10 % empty captions
   (for classifier-free guidance); the text encoder trains with it. An EMA of both is what is shipped.

The VAE is rounded to fp16 before the UNet learns from its latents, so they are exactly what the shipped file makes.
Writes `cli/demo/base/demo-base.safetensors` (fp16) and `build.json` (seed, command, versions, timings, sha256).
Bit-identical output needs the same torch version and thread count.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...trainer.bundles.demo import METADATA_KEY, UNET_CONFIG, VAE_CONFIG, WEIGHTS, make_modules
from ...trainer.lorafile import atomic_write
from ...trainer.schedule import scaled_linear_alphas_cumprod
from ...trainer.tokenizer import load_clip_tokenizer
from .scenes import base_scene, render, vae_scene


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def to_tensor(images: list) -> torch.Tensor:
    """PIL images → [B,3,H,W] in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def _fp16_round(module: torch.nn.Module) -> torch.nn.Module:
    """What the shipped fp16 file will hold, kept in float32 for computing."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae: torch.nn.Module, steps: int, batch: int, seed: int, lr: float = 2e-3) -> list[float]:
    """Reconstruction (L1 + MSE) of `vae_scene`s. The latents get a little noise first: the decoder will be fed what
    the UNet generates, which is never exactly a clean latent."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x = to_tensor([render(vae_scene(rng)) for _ in range(batch)])
        z = vae.encode(x).latent_dist.mean
        z = z + 0.03 * torch.rand((batch, 1, 1, 1), generator=gen) * torch.randn(z.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            _log(f"vae step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_dataset(vae: torch.nn.Module, count: int, seed: int,
                   uncond_rate: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Latents (posterior mean, unscaled) of `count` base scenes, the index of each one's caption, and the token ids of
    the distinct captions (a tenth of the scenes get the empty caption)."""
    rng = random.Random(seed)
    tokenizer = load_clip_tokenizer("clip-l")
    latents, caption_ids, captions = [], [], {"": 0}
    for start in range(0, count, 64):
        scenes = [base_scene(rng) for _ in range(min(64, count - start))]
        latents.append(vae.encode(to_tensor([render(s) for s, _ in scenes])).latent_dist.mean)
        for _, text in scenes:
            text = "" if rng.random() < uncond_rate else text
            caption_ids.append(captions.setdefault(text, len(captions)))
    texts = list(captions)
    tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
    return torch.cat(latents), torch.tensor(caption_ids), tokens, texts


def train_unet(unet: torch.nn.Module, te: torch.nn.Module, latents: torch.Tensor, caption_ids: torch.Tensor,
               tokens: torch.Tensor, steps: int, batch: int, seed: int,
               lr: float) -> tuple[torch.nn.Module, torch.nn.Module, list[float]]:
    """v-prediction training of the UNet and, jointly, the text encoder; returns EMAs of both."""
    gen = torch.Generator().manual_seed(seed)
    ac = scaled_linear_alphas_cumprod()
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-γ (γ=5) for v: no timestep range dominates
    # A random CLIP's embeddings of "red" and "green" differ by a few percent; trained, they differ clearly, and the
    # conditioning is learned in a fraction of the steps. Embedding tables get no weight decay: the rows of words
    # the captions never use (a trigger word) keep their random values.
    decayed = [p for n, p in [*unet.named_parameters(), *te.named_parameters()] if "embedding" not in n]
    plain = [p for n, p in te.named_parameters() if "embedding" in n]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}],
                            lr=lr)
    models = torch.nn.ModuleList([unet, te])
    ema = copy.deepcopy(models).requires_grad_(False)
    models.train().requires_grad_(True)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(ac), (batch,), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        context = te(tokens[caption_ids[idx]])[0]
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = (weight[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), models.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            _log(f"unet step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f}")
    ema.eval()
    return ema[0], ema[1], losses


def save(path: Path, unet: torch.nn.Module, vae: torch.nn.Module, te: torch.nn.Module, scaling_factor: float,
         info: dict) -> Path:
    from safetensors.torch import save_file

    state = {}
    for prefix, module in (("unet.", unet), ("vae.", vae), ("text_encoder.", te)):
        state.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
    # One metadata entry: safetensors writes several in a random order, and the file would differ from build to build.
    header = {"unet_config": UNET_CONFIG, "vae_config": VAE_CONFIG, "scaling_factor": scaling_factor, "recipe": info}
    meta = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta), overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraloop.cli.demo.build_base", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it; default 1)")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1.5e-3)
    parser.add_argument("--scenes", type=int, default=20000, help="base scenes the UNet learns from")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.monotonic()
    unet, vae, te = make_modules()
    _log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, {args.vae_steps} steps")
    vae_losses = train_vae(vae, args.vae_steps, args.vae_batch, args.seed + 1)
    vae = _fp16_round(vae).requires_grad_(False)
    vae_done = time.monotonic()
    latents, caption_ids, tokens, texts = encode_dataset(vae, args.scenes, args.seed + 2)
    scaling_factor = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    _log(f"{len(latents)} scenes, {len(texts)} distinct captions; latent scaling factor {scaling_factor:.5f}")
    _log(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, {args.unet_steps} steps")
    unet, te, unet_losses = train_unet(unet, te, latents, caption_ids, tokens, args.unet_steps, args.unet_batch,
                                       args.seed + 3, args.unet_lr)
    # The recipe goes into the file; timings and paths only into build.json, so that a rebuild is the same file.
    recipe = {"seed": args.seed, "threads": args.threads, "vae_steps": args.vae_steps, "vae_batch": args.vae_batch,
              "unet_steps": args.unet_steps, "unet_batch": args.unet_batch, "unet_lr": args.unet_lr,
              "scenes": args.scenes, "torch": torch.__version__}
    path = save(args.output, unet, vae, te, scaling_factor, recipe)
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    info = {"command": f"python -m loraloop.cli.demo.build_base {args_text}".strip(), **recipe,
            "scaling_factor": scaling_factor, "vae_final_loss": round(float(np.mean(vae_losses[-50:])), 5),
            "unet_final_loss": round(float(np.mean(unet_losses[-50:])), 5),
            "seconds": {"vae": round(vae_done - started), "total": round(time.monotonic() - started)},
            "python": platform.python_version(), "machine": platform.machine()}
    info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    info["bytes"] = path.stat().st_size
    text = json.dumps(info, indent=2) + "\n"
    atomic_write(path.with_name("build.json"), lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    _log(f"wrote {path} ({info['bytes'] / 1e6:.1f} MB) in {info['seconds']['total']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
