"""`loraloop plan`: registered through `add_plan_parser`, text and JSON output, exit codes."""

from __future__ import annotations

import argparse
import json

import pytest

from loraloop.cli.plan import add_plan_parser

pytestmark = pytest.mark.usefixtures("one_thread")


def run_plan(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="loraloop")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


class TestPlanCommand:
    def test_sdxl_1024_fits_8_gb_as_json(self, capsys):
        """The issue's target through the CLI: an 8 GB card trains SDXL at 1024 after the CUDA context's share."""
        code, out = run_plan(["--family", "sdxl", "--resolution", "1024", "--vram-gb", "8", "--json"], capsys)
        data = json.loads(out)
        assert code == 0 and data["fits"] and data["peak_gb"] <= data["budget_gb"] < 8
        assert data["settings"]["gradient_checkpointing"] is True and data["settings"]["resolution"] == 1024
        assert data["seconds_per_step"] > 0 and all(c["reason"] for c in data["changes"])

    def test_sd15_text_output(self, capsys):
        code, out = run_plan(["--family", "sd15", "--vram-gb", "4", "--device", "RTX 3060", "--steps", "1000"],
                             capsys)
        assert code == 0
        assert "estimated peak:" in out and "fits" in out and "seconds per step:" in out
        assert "total:             1000 steps" in out and "NVIDIA GeForce RTX 3060" in out

    def test_nothing_fits_exits_1(self, capsys):
        code, out = run_plan(["--family", "sdxl", "--vram-gb", "3"], capsys)
        assert code == 1 and "DOES NOT FIT" in out and "advice:" in out

    def test_config_with_auto_keys(self, tmp_path, capsys, demo_dataset):
        """Keys set to `auto` may change; the dataset's buckets and recommendations are used."""
        config = tmp_path / "run.yaml"
        config.write_text(f"base_model: sd15.safetensors\nfamily: sd1\ntrain_data_dir: {demo_dataset}\n"
                          f"metadata_path: {demo_dataset / 'metadata.csv'}\nresolution: 64\nmin_bucket_reso: 32\n"
                          "max_bucket_reso: 128\nbucket_reso_steps: 32\nbatch_size: 1\ngradient_checkpointing: auto\n"
                          "mixed_precision: auto\nmax_train_steps: 10\n")
        code, out = run_plan(["--config", str(config), "--vram-gb", "6", "--json"], capsys)
        data = json.loads(out)
        assert code == 0 and data["family"] == "sd1" and data["total_steps"] == 10
        assert data["settings"]["batch_size"] == 1  # not auto: kept
        assert {r["key"] for r in data["recommendations"]} >= {"lora_rank", "learning_rate", "max_train_steps"}

    def test_auto_on_a_key_the_planner_does_not_own_is_an_error(self, tmp_path, capsys):
        from loraloop.trainer.errors import ConfigError

        config = tmp_path / "run.yaml"
        config.write_text("learning_rate: auto\n")
        expected = r"`learning_rate` in .* cannot be auto; `auto` is allowed for batch_size"
        with pytest.raises(ConfigError, match=expected):
            run_plan(["--config", str(config)], capsys)
