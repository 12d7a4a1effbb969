"""`dynamic_rank`: train at lora_rank, then cut every module to the rank holding that share of its energy at each save
(step saves, the final LoRA, a cancel), while training and its resumable state stay at lora_rank."""

from collections import Counter
from dataclasses import replace

import pytest
import torch
from test_loop import StopAfter, config_for

from loraloop.trainer.batches import dataset_options
from loraloop.trainer.config import TrainConfig, load_config
from loraloop.trainer.data import TrainDataset
from loraloop.trainer.errors import ConfigError, TrainingInterrupted
from loraloop.trainer.lorafile import load_lora
from loraloop.trainer.network import Network
from loraloop.trainer.progress import NullSink
from loraloop.trainer.resize import Target, read_modules, resize_state_dict
from loraloop.trainer.runner import prepare_batches
from loraloop.trainer.session import SessionHooks, TrainingSession


def session_for(bundle, config, folder, sink=None):
    dataset = TrainDataset.from_options(dataset_options(config), seed=config.seed)
    batches = prepare_batches(bundle, dataset, config, NullSink())
    hooks = SessionHooks(lora_path=lambda stem: folder / f"{stem}.safetensors")
    return TrainingSession(bundle, config, dataset, sink or NullSink(), hooks), batches


def ranks_of(tensors):
    return {m.name: m.rank for m in read_modules(tensors)[0]}


def test_config_reads_and_checks_dynamic_rank(tmp_path):
    assert TrainConfig().dynamic_rank is None
    (tmp_path / "c.yaml").write_text("dynamic_rank: 0.95\nlora_rank: 32\n")
    assert load_config(tmp_path / "c.yaml").dynamic_rank == 0.95
    with pytest.raises(ConfigError, match=r"`dynamic_rank` must be between 0.1 and 1"):
        TrainConfig(dynamic_rank=1.5).validate()
    with pytest.raises(ConfigError, match=r"`dynamic_rank` cuts the rank of lora/locon modules.*network_type lora"):
        TrainConfig(dynamic_rank=0.9, network_type="loha").validate()


def test_saves_are_cut_by_energy_while_training_stays_at_full_rank(tiny_sd1, demo_dataset, tmp_path):
    config = config_for(demo_dataset, max_train_steps=4, lora_rank=16, lora_alpha=8, learning_rate=5e-3,
                        dynamic_rank=0.9, save_every_n_steps=2, save_precision="fp32")
    session, batches = session_for(tiny_sd1, config, tmp_path)
    result = session.train(batches)
    plain, plain_batches = session_for(tiny_sd1, replace(config, dynamic_rank=None, save_every_n_steps=None),
                                       tmp_path / "plain")
    full = plain.train(plain_batches)
    assert result.losses == full.losses  # the cut happens at saves only: training is the same

    # the final LoRA is the full one resized to energy 0.9, per module
    expected = resize_state_dict(full.state_dict, full.metadata, Target("energy", 0.9))
    assert set(result.state_dict) == set(expected.tensors)
    assert all(torch.equal(result.state_dict[k], expected.tensors[k]) for k in expected.tensors)
    ranks = ranks_of(result.state_dict)
    assert max(ranks.values()) <= 16 and sum(ranks.values()) < 16 * len(ranks) and len(set(ranks.values())) > 1
    assert all(m.kept_energy >= 0.9 - 1e-9 for m in expected.report.modules)
    assert result.metadata["ss_network_dim"] == str(Counter(ranks.values()).most_common(1)[0][0])
    assert '"target": "energy"' in result.metadata["loraloop_resize"]
    assert '"dynamic_rank": 0.9' in result.metadata["loraloop_config"]

    # previews and hosts load it with the session's spec; the resumable state keeps rank 16
    assert session.spec is result.spec
    with Network(tiny_sd1, result.spec) as network:
        network.load_state_dict(result.state_dict)
    assert {v.shape[0] for k, v in result.train_state.adapter.items() if k.endswith("lora_down.weight")} == {16}

    # the step save was cut too (its own ranks, from the adapters at step 2)
    step2, metadata = load_lora(tmp_path / f"{config.output_name}-step000002.safetensors")
    assert max(ranks_of(step2).values()) <= 16 and "loraloop_resize" in metadata

    # what the cut costs: the LoRA's effect on the UNet output is mostly kept
    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    with torch.no_grad():
        cond = tiny_sd1.encode_text(["flat style, a red circle", "a green square"])
        base = tiny_sd1.predict(latents, t, cond)
        outputs = []
        for spec, state in ((full.spec, full.state_dict), (result.spec, result.state_dict)):
            with Network(tiny_sd1, spec) as network:
                network.load_state_dict(state)
                outputs.append(tiny_sd1.predict(latents, t, cond))
    effect, lost = (outputs[0] - base).norm(), (outputs[1] - outputs[0]).norm()
    assert lost < 0.5 * effect, (lost, effect)


def test_a_cancel_saves_the_cut_lora(tiny_sd1, demo_dataset, tmp_path):
    config = config_for(demo_dataset, max_train_steps=6, lora_rank=16, lora_alpha=16, learning_rate=5e-3,
                        dynamic_rank=0.8)
    session, batches = session_for(tiny_sd1, config, tmp_path, StopAfter(2))
    with pytest.raises(TrainingInterrupted) as stop:
        session.train(batches)
    tensors, metadata = load_lora(stop.value.saved)
    assert stop.value.saved.name == f"{config.output_name}-cancelled-step000002.safetensors"
    assert max(ranks_of(tensors).values()) < 16 and "loraloop_resize" in metadata
