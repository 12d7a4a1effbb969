"""Pure functions of (step, config): noise schedule, targets, loss weights, learning-rate schedules, optimizers."""

import math

import pytest
import torch

from loraloop.trainer.errors import ConfigError, MissingDependencyError
from loraloop.trainer.optim import available, build_optimizer
from loraloop.trainer.schedule import (
    add_noise,
    lr_factor,
    min_snr_weight,
    scaled_linear_alphas_cumprod,
    snr,
    target_for,
)

AC = scaled_linear_alphas_cumprod()


class TestNoise:
    def test_schedule_matches_stable_diffusion(self):
        """ᾱ of SD's scaled-linear schedule: known end points (diffusers DDPMScheduler gives the same)."""
        from diffusers import DDPMScheduler

        ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
        assert torch.allclose(AC, ref, atol=1e-6)
        assert math.isclose(AC[0].item(), 1 - 0.00085, rel_tol=1e-6)

    def test_v_target_is_diffusers_velocity(self):
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999])
        assert torch.allclose(target_for("v_prediction", x0, eps, t, AC), sched.get_velocity(x0, eps, t), atol=1e-5)
        assert torch.allclose(add_noise(x0, eps, t, AC), sched.add_noise(x0, eps, t), atol=1e-5)
        assert target_for("epsilon", x0, eps, t, AC) is eps

    def test_min_snr_weights(self):
        """min(SNR,γ)/SNR for ε and min(SNR,γ)/(SNR+1) for v; 1 at high noise for ε."""
        t = torch.tensor([10, 999])
        s = snr(t, AC)
        eps_w = min_snr_weight(t, AC, 5.0, "epsilon")
        v_w = min_snr_weight(t, AC, 5.0, "v_prediction")
        assert torch.allclose(eps_w, torch.clamp(s, max=5) / s)
        assert torch.allclose(v_w, torch.clamp(s, max=5) / (s + 1))
        assert eps_w[1].item() == pytest.approx(1.0) and eps_w[0].item() < 0.1


class TestLearningRate:
    @pytest.mark.parametrize(("scheduler", "step", "expected"), [
        ("constant", 50, 1.0), ("linear", 10, 1.0), ("linear", 55, 0.5), ("linear", 100, 0.0),
        ("cosine", 10, 1.0), ("cosine", 55, 0.5), ("cosine", 100, 0.0),
        ("cosine_with_restarts", 10, 1.0), ("cosine_with_restarts", 55, 1.0), ("cosine_with_restarts", 100, 0.0),
    ])
    def test_after_warmup(self, scheduler, step, expected):
        """10 warmup steps, 100 total; restarts: 2 cycles."""
        got = lr_factor(step, scheduler=scheduler, warmup_steps=10, total_steps=100, num_cycles=2)
        assert got == pytest.approx(expected, abs=1e-6)

    def test_restarts_restart(self):
        """Two cycles over 100 steps: halfway down at 25 and 75, back to the top at 50."""
        f = [lr_factor(s, scheduler="cosine_with_restarts", warmup_steps=0, total_steps=100, num_cycles=2)
             for s in (25, 49, 50, 75)]
        assert f[0] == pytest.approx(0.5) and f[1] < 0.01 and f[2] == pytest.approx(1.0) and f[3] == pytest.approx(0.5)

    def test_warmup_is_linear_and_never_zero(self):
        factors = [lr_factor(s, scheduler="cosine", warmup_steps=4, total_steps=10) for s in range(4)]
        assert factors == pytest.approx([0.2, 0.4, 0.6, 0.8])

    def test_unknown_scheduler(self):
        with pytest.raises(ValueError, match="unknown lr_scheduler 'step'; choose one of constant, linear"):
            lr_factor(0, scheduler="step", warmup_steps=0, total_steps=1)


class TestOptimizers:
    def test_adamw_groups_keep_their_lr(self):
        a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        opt = build_optimizer("adamw", [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-5}], 1e-4, 0.0)
        assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-5]

    # adamw8bit is not here: without bitsandbytes it is the torch AdamW8bit (tests/test_optim8bit.py).
    @pytest.mark.parametrize(("name", "package"), [("prodigy", "prodigyopt"), ("lion", "lion-pytorch")])
    def test_missing_package_says_how_to_install(self, name, package):
        if available()[name]:
            pytest.skip(f"{package} is installed here")
        with pytest.raises(MissingDependencyError, match=f"optimizer `{name}` needs the package {package}; install "
                                                         f"it with `pip install {package}` or use adamw"):
            build_optimizer(name, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-4, 0.0)

    def test_unknown_optimizer(self):
        with pytest.raises(ConfigError, match="`optimizer` must be one of"):
            build_optimizer("sgd", [], 1e-4, 0.0)


def test_gradient_checkpointing_is_exact_and_leaves_no_trace(tiny_sd1):
    """The checkpointed backward gives the same LoRA grads; the blocks' forwards are restored afterwards."""
    from loraloop.trainer.checkpointing import gradient_checkpointing
    from loraloop.trainer.network import Network, NetworkSpec

    lat, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    cond = tiny_sd1.encode_text(["a", "b"])
    grads = []
    with Network(tiny_sd1, NetworkSpec(rank=2)) as net:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        for enabled in (False, True):
            with gradient_checkpointing(tiny_sd1.unet, enabled) as wrapped:
                tiny_sd1.predict(lat, t, cond).square().mean().backward()
            assert wrapped == (18 if enabled else 0)  # the tiny UNet's 12 ResNets and 6 transformer blocks
            grads.append([p.grad.clone() for p in net.parameters()])
            for p in net.parameters():
                p.grad = None
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert not any("forward" in m.__dict__ for m in tiny_sd1.unet.modules())
