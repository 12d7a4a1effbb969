"""The command line as a user runs it: the demo end to end, and clear one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from loraloop.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end(tmp_path):
    """`python -m loraloop demo` writes the LoRA, the loss plot and a before/after grid, and says where."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "loraloop", "demo", "--output", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("demo_lora.safetensors", "demo_lora_loss.png", "demo_lora_samples.png", "demo_lora.yaml",
                 "demo_lora-state.pt"):
        assert (out / name).is_file(), name
        assert str(out / name) in proc.stdout or name.endswith((".pt", ".yaml"))
    with safe_open(str(out / "demo_lora.safetensors"), "pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "80"
    assert all(k.startswith("lora_unet_") for k in keys)
    first, last = proc.stdout.split("final loss ")[1].split(" (first 10 steps: ")
    assert float(first) < float(last.split(")")[0])  # the loss went down


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class TestErrors:
    def test_typo_in_config_key(self, tmp_path, capsys):
        cfg = write(tmp_path / "c.yaml", "lora_rnak: 4\n")
        assert main(["train", "--config", str(cfg)]) == 2
        assert capsys.readouterr().err.strip() == f"error: unknown key `lora_rnak` in {cfg}; did you mean `lora_rank`?"

    def test_out_of_range_value(self, tmp_path, capsys):
        cfg = write(tmp_path / "c.yaml", "lora_rank: 0\n")
        assert main(["train", "--config", str(cfg)]) == 2
        assert "`lora_rank` must be between 1 and 1024 (got 0)" in capsys.readouterr().err

    def test_missing_dataset_folder(self, tmp_path, capsys):
        cfg = write(tmp_path / "c.yaml", f"train_data_dir: {tmp_path / 'nope'}\n")
        assert main(["train", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "nope") in err and err.startswith("error: ")

    def test_missing_config_file(self, tmp_path, capsys):
        assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
        assert f"config file {tmp_path / 'none.yaml'} does not exist" in capsys.readouterr().err

    def test_existing_output_is_not_overwritten(self, tmp_path, demo_dataset, capsys):
        (tmp_path / "out").mkdir()
        target = tmp_path / "out" / "x.safetensors"
        target.write_bytes(b"precious")
        cfg = write(tmp_path / "c.yaml", f"train_data_dir: {demo_dataset}\noutput_dir: {tmp_path / 'out'}\n"
                    "output_name: x\n")
        assert main(["train", "--config", str(cfg)]) == 2
        assert f"{target} already exists" in capsys.readouterr().err
        assert target.read_bytes() == b"precious"

    def test_set_override_needs_key_value(self, tmp_path, capsys):
        cfg = write(tmp_path / "c.yaml", "lora_rank: 4\n")
        assert main(["train", "--config", str(cfg), "--set", "lora_rank"]) == 2
        assert "--set expects key=value" in capsys.readouterr().err


def test_check_dataset_reports_and_exits_nonzero_when_training_would_fail(tmp_path, demo_dataset, capsys):
    assert main(["check-dataset", str(demo_dataset), "--metadata", str(demo_dataset / "metadata.csv"),
                 "--resolution", "64"]) == 0
    report = capsys.readouterr().out
    assert "12" in report
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check-dataset", str(empty)]) == 1


def test_config_explain_shows_sources(tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", "network_dim: 16\n")
    assert main(["config", "--explain", str(cfg)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "16" in lines["lora_rank"] and f"[{cfg}]" in lines["lora_rank"]
    assert "[default]" in lines["learning_rate"]


def test_engine_imports_no_host_code():
    """`loraloop.trainer` imports with every host module blocked (ComfyUI, A1111, Forge, gradio)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'comfy', 'folder_paths', 'server', 'modules', 'ldm_patched', 'backend',\n"
        "                                  'gradio', 'comfy_api', 'launch', 'modules_forge'}:\n"
        "            raise ImportError('host module ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pkgutil, importlib, loraloop.trainer\n"
        "for m in pkgutil.walk_packages(loraloop.trainer.__path__, 'loraloop.trainer.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0


def test_config_explain_shows_cache_text_encoder_outputs(tmp_path, capsys):
    """`config --explain` lists the text-cache switch with its value, source and help."""
    cfg = write(tmp_path / "c.yaml", "cache_text_encoder_outputs: false\n")
    assert main(["config", "--explain", str(cfg)]) == 0
    line = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}["cache_text_encoder_outputs"]
    assert "False" in line and f"[{cfg}]" in line and "Encode each caption once" in line


def test_ctrl_c_mid_training_saves_the_last_completed_step(tmp_path):
    """Ctrl-C is a cancel, not a traceback: the LoRA as of the last completed step is written, exit code 130."""
    import signal
    import time

    from loraloop.trainer.lorafile import load_lora

    demo = ROOT / "cli" / "demo" / "dataset"
    config = write(tmp_path / "long.yaml", f"""\
base_model: builtin:tiny-sd1
train_data_dir: {demo}
metadata_path: {demo / "metadata.csv"}
resolution: 64
min_bucket_reso: 32
max_bucket_reso: 128
bucket_reso_steps: 16
max_train_steps: 100000
save_every_n_steps: 2
output_dir: {tmp_path / "out"}
output_name: long
""")
    proc = subprocess.Popen([sys.executable, "-m", "loraloop", "train", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (tmp_path / "out" / "long-step000002.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    saved = sorted((tmp_path / "out").glob("long-cancelled-step*.safetensors"))
    assert len(saved) == 1 and f"saved what was trained so far to {saved[0]}" in err
    steps = int(saved[0].stem.rsplit("step", 1)[1])
    assert steps >= 2 and load_lora(saved[0])[1]["ss_steps"] == str(steps)
    assert not (tmp_path / "out" / "long.safetensors").exists()
