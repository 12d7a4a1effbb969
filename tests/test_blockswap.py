"""Block swap (trainer/blockswap.py) on a diffusers Flux with 2 double + 3 single blocks: the same losses and adapter
gradients as the plain run, at most two swapped blocks on the device at once, everything home afterwards; and the
OOM ladder's `swap` rung."""

from __future__ import annotations

import pytest
import torch

from loraloop.trainer.blockswap import BlockSwap, place_unswapped, swappable_blocks
from loraloop.trainer.bundles.tiny import build_tiny_flow_bundle
from loraloop.trainer.checkpointing import gradient_checkpointing
from loraloop.trainer.loss import LossSettings, diffusion_loss, draw_noise
from loraloop.trainer.network import Network, NetworkSpec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flow_bundle("tiny-flux1", layers=(2, 3))


def _batch(bundle):
    latents = bundle.encode_images(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    cond = bundle.encode_text(["a red circle", "a blue square"])
    draw = draw_noise(latents.shape, torch.Generator().manual_seed(0), LossSettings(), 0, flow=True)
    return latents, cond, draw


def _steps(bundle, swap: int, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor], BlockSwap | None]:
    """Train `steps` AdamW steps with checkpointing and `swap` blocks swapped; (losses, adapters, the swapper)."""
    latents, cond, draw = _batch(bundle)
    torch.manual_seed(0)
    losses = []
    with Network(bundle, NetworkSpec(rank=4, alpha=4)) as network:
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
        with gradient_checkpointing(bundle.unet), BlockSwap(bundle.unet, swap, "cpu") as swapper:
            for _ in range(steps):
                loss = diffusion_loss(bundle, latents, cond, draw, LossSettings())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                assert all(s.module._parameters[s.name].data.data_ptr() == s.host.data_ptr()
                           for b in swapper.swapped.values() if b.copies is None for s in b.slots)
        adapters = {k: v.clone() for k, v in network.state_dict(torch.float32).items()}
    return losses, adapters, swapper


def test_swapped_training_equals_the_plain_run_and_everything_comes_home(flux):
    params = dict(flux.unet.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    plain, plain_adapters, _ = _steps(flux, 0)
    swapped, adapters, swapper = _steps(flux, 3)
    assert swapped == plain  # exact: the copies are exact and the maths is the same
    for key, value in plain_adapters.items():
        assert torch.equal(value, adapters[key]), key
    # Per step each swapped block is loaded in forward and again for its recompute in backward, except the last one,
    # still on the device when backward starts.
    assert swapper.count == 3 and swapper.loads == 3 * (2 * 3 - 1)
    assert swapper.max_resident <= 2  # the block computing and the one prefetched
    after = dict(flux.unet.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)  # the same objects
    assert all(torch.equal(before[k], after[k]) for k in params)
    assert not any(m._forward_pre_hooks for m in flux.unet.modules())


def test_only_the_last_blocks_are_swapped_and_their_bytes_are_counted(flux):
    blocks = swappable_blocks(flux.unet)
    assert [type(b).__name__ for b in blocks] == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 3
    with BlockSwap(flux.unet, 2, "cpu") as swapper:
        assert sorted(swapper.swapped) == [3, 4]
        assert swapper.moved_bytes == sum(p.numel() * 4 for b in blocks[3:] for p in b.parameters())
    with BlockSwap(flux.unet, 99, "cpu") as swapper:  # capped at the block count
        assert swapper.count == 5


def test_place_unswapped_leaves_the_swapped_blocks_where_they_are():
    transformer = build_tiny_flow_bundle("tiny-flux1", layers=(2, 3)).unet  # its own: it ends on the meta device
    place_unswapped(transformer, torch.device("meta"), 2)
    blocks = swappable_blocks(transformer)
    assert all(p.device.type == "cpu" for b in blocks[3:] for p in b.parameters())
    assert all(p.device.type == "meta" for b in blocks[:3] for p in b.parameters())
    assert transformer.x_embedder.weight.device.type == "meta"


def test_the_cli_run_with_blocks_to_swap_gives_the_same_losses(tmp_path, demo_dataset, caplog):
    """`blocks_to_swap` through the whole runner (on the CPU it swaps between two CPU copies: same mechanics)."""
    from loraloop.trainer.config import TrainConfig
    from loraloop.trainer.progress import NullSink
    from loraloop.trainer.runner import run

    def config(swap: int) -> TrainConfig:
        return TrainConfig(base_model="builtin:tiny-flux1", train_data_dir=str(demo_dataset), resolution=64,
                           enable_bucket=False, max_train_steps=3, batch_size=2, lora_rank=4, learning_rate=1e-3,
                           blocks_to_swap=swap, auto=[], output_dir=str(tmp_path / f"swap{swap}"),
                           save_precision="fp32").validate()

    plain = run(config(0), NullSink()).result
    with caplog.at_level("INFO", logger="loraloop.trainer.blockswap"):
        swapped = run(config(2), NullSink()).result
    assert swapped.losses == plain.losses
    assert any(m.startswith("block swap: 2 of 2 blocks") for m in caplog.messages)
    assert swapped.config.blocks_to_swap == 2


class SwapBound:
    """The tiny Flux behind a fake card: `predict` runs out of memory while fewer than `need` blocks are swapped."""

    def __init__(self, inner, need: int) -> None:
        self._inner, self.need, self.recovery = inner, need, None

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def predict(self, noisy, sigmas, cond, sizes=None):
        swap = self.recovery._swap if self.recovery is not None else None
        if (swap.count if swap is not None else 0) < self.need:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (injected)")
        return self._inner.predict(noisy, sigmas, cond, sizes)


def test_the_oom_ladder_swaps_more_blocks_and_redoes_the_step(demo_dataset):
    """Out of memory from the second step until 3 of 5 blocks stream: the `swap` rung pulls 2, then 4 blocks (a quarter
    of the blocks, rounded up, per rung); every step runs once, in order, with exactly the plain run's losses."""
    from loraloop.trainer import loop
    from loraloop.trainer.batches import dataset_options
    from loraloop.trainer.config import TrainConfig
    from loraloop.trainer.data import TrainDataset
    from loraloop.trainer.memory import OomRecovery
    from loraloop.trainer.metadata import RunInfo
    from loraloop.trainer.progress import NullSink
    from loraloop.trainer.runner import prepare_batches

    config = TrainConfig(train_data_dir=str(demo_dataset), resolution=64, enable_bucket=False, batch_size=1,
                         max_train_steps=3, lora_rank=4, learning_rate=1e-3, gradient_checkpointing=True,
                         auto=[], save_precision="fp32").validate()
    inner = build_tiny_flow_bundle("tiny-flux1", layers=(2, 3))

    def train(need: int, oom_from: int):
        bundle = SwapBound(inner, 0)
        batches = prepare_batches(bundle, TrainDataset.from_options(dataset_options(config), seed=1), config,
                                  NullSink())
        recovery = OomRecovery(bundle, batches, config, run=RunInfo(), spill_guard=None)
        recovery._rungs_done.add("optimizer")  # this test is about the swap rung alone
        bundle.recovery = recovery
        result = loop.train(bundle, batches, config, recovery=recovery,
                            on_step_end=lambda step, _: setattr(bundle, "need", need if step >= oom_from else 0))
        return result, recovery

    reference, _ = train(0, 99)
    result, recovery = train(3, 1)
    assert [(a.rung, a.old, a.new) for a in recovery.adjustments] == [("swap", 0, 2), ("swap", 2, 4)]
    assert result.losses == reference.losses and result.steps == 3
    assert result.config.blocks_to_swap == 4
    assert not any(m._forward_pre_hooks for m in inner.unet.modules())


@pytest.mark.parametrize(("model_swap", "fp8_swap", "expected"), [
    (0, 0, "model"),  # fits as loaded without streaming: keep the model's dtype
    (30, 10, "fp8"),  # fp8 streams fewer blocks: faster
    (30, 30, "model"),
    (None, 5, "fp8"),  # does not fit as loaded
    (None, None, "model"),  # nothing fits: the plan as loaded says what would
])
def test_base_weight_dtype_auto_takes_fp8_when_it_streams_fewer_blocks(monkeypatch, model_swap, fp8_swap, expected):
    from types import SimpleNamespace

    from loraloop.trainer import runner
    from loraloop.trainer.config import TrainConfig
    from loraloop.trainer.errors import ConfigError

    def fake_plan(config, dataset, bundle, sink):
        swap = model_swap if config.base_weight_dtype == "model" else fp8_swap
        if swap is None:
            raise ConfigError("does not fit", key="auto")
        return SimpleNamespace(shape=SimpleNamespace(blocks_to_swap=swap))

    monkeypatch.setattr(runner, "plan_memory", fake_plan)
    config = TrainConfig(base_weight_dtype="auto")
    assert runner.choose_weight_dtype(config, None, None).base_weight_dtype == expected
    assert runner.choose_weight_dtype(TrainConfig(base_weight_dtype="fp8"), None, None).base_weight_dtype == "fp8"
