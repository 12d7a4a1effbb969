"""`loraloop` command line: train, demo, check-dataset, config. Every expected failure ends in one clear line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import replace as _replace
from pathlib import Path

from PIL import Image

from ..trainer.errors import LoraLoopError, TrainingInterrupted
from ..trainer.progress import StepInfo

log = logging.getLogger("loraloop")


class TqdmSink:
    """Progress bar with loss, learning rate and ETA; Ctrl-C cancels cleanly (what was trained so far is saved)."""

    interrupt_errors = (KeyboardInterrupt,)  # Ctrl-C mid-step is a cancel: the last completed step is saved

    def __init__(self) -> None:
        self._bar = None
        self.cancelled = False

    def status(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"» {text}", file=sys.stderr)

    def step(self, info: StepInfo) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=info.total, initial=info.step - 1, desc="training", unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        self._bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
        self._bar.update(1)
        if info.step == info.total:
            self._bar.close()

    def preview(self, step: int, image: Image.Image) -> None:
        pass

    def should_stop(self) -> bool:
        return self.cancelled


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            msg = f"--set expects key=value (got {pair!r})"
            raise LoraLoopError(msg)
        out[key.strip()] = value.strip()
    return out


def _train(config, sink: TqdmSink, resume: Path | None = None) -> int:  # noqa: ANN001
    from ..trainer.runner import run

    try:
        outputs = run(config, sink, resume_state=resume)
    except KeyboardInterrupt:  # before training started: nothing to save
        print("cancelled", file=sys.stderr)
        return 130
    except TrainingInterrupted as stop:
        saved = getattr(stop, "saved", None)
        print(f"cancelled; {f'saved what was trained so far to {saved}' if saved else 'nothing was saved'}",
              file=sys.stderr)
        return 130
    if outputs.lora is None:  # another rank of a torchrun launch: rank 0 reports and writes
        return 0
    r = outputs.result
    print(f"\ntrained {r.steps} steps, final loss {sum(r.losses[-10:]) / max(1, len(r.losses[-10:])):.4f} "
          f"(first 10 steps: {sum(r.losses[:10]) / max(1, len(r.losses[:10])):.4f})")
    print(f"LoRA:        {outputs.lora}")
    print(f"config:      {outputs.config}")
    print(f"loss plot:   {outputs.loss_plot}")
    if outputs.samples:
        print(f"samples:     {outputs.samples}  (top: before, bottom: after)")
    if outputs.state:
        print(f"resume with: loraloop train --config {outputs.config} --resume {outputs.state}")
    print(f"use it as:   <lora:{config.output_name}:0.8>")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..trainer.config import load_config

    overrides = _overrides(args.set or [])
    if args.overwrite:
        overrides["overwrite"] = "true"
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    config = load_config(args.config, overrides)
    return _train(config, TqdmSink(), Path(args.resume) if args.resume else None)


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from ..trainer.config import load_config
    from ..trainer.lorafile import atomic_write
    from ..trainer.runner import load_bundle
    from .demo import DEMO_CONFIG
    from .demo.showcase import showcase, training_images

    config = load_config(DEMO_CONFIG, {"output_dir": args.output, "overwrite": "true"})
    print(f"demo: teaching {config.base_model} the `{config.trigger_word}` concept of {Path(config.train_data_dir)}")
    # The runner's own before/after grid is replaced by one with the LoRA at 0, 0.5 and 1.0, made below.
    code = _train(_replace(config, sample_prompts=[]), TqdmSink())
    if code:
        return code
    folder, name = Path(config.output_dir), config.output_name
    print("sampling the same prompts and seeds with the LoRA at 0, 0.5 and 1.0 ...", file=sys.stderr)
    references = training_images(config)
    shown = showcase(load_bundle(config), config, folder / f"{name}.safetensors", references)
    grid = shown.grid(references)
    path = atomic_write(folder / f"{name}_samples.png", lambda tmp: grid.save(tmp, format="PNG"), overwrite=True)
    print(f"samples:     {path}  (rows: LoRA 0 = the base model, 0.5, 1.0; last row: training images)")
    print(shown.summary())
    if args.picture:
        copy = atomic_write(Path(args.picture), lambda tmp: shutil.copyfile(path, tmp), overwrite=True)
        print(f"copied to:   {copy}")
    return 0


def cmd_check_dataset(args: argparse.Namespace) -> int:
    from ..trainer.batches import dataset_options
    from ..trainer.config import TrainConfig, bucket_defaults, load_config
    from ..trainer.data import check_dataset, format_report

    # The same dataset options training would use: from --config, else from the flags and the config defaults.
    config = load_config(args.config) if args.config else TrainConfig()
    if args.resolution:
        config = _replace(config, **bucket_defaults(args.resolution))
    overrides = {"train_data_dir": args.dir, "recursive": args.recursive or config.recursive}
    if args.metadata:
        overrides["metadata_path"] = args.metadata
    if args.trigger_word:
        overrides["trigger_word"] = args.trigger_word
    options = dataset_options(_replace(config, **overrides))
    report = check_dataset(options, decode=not args.fast)
    print(format_report(report))
    return 1 if report.will_fail else 0


def cmd_config(args: argparse.Namespace) -> int:
    from ..trainer.config import field_help, load_config

    sources: dict[str, str] = {}
    config = load_config(args.file, sources=sources)
    values = config.to_dict()
    width = max(map(len, values))
    for key, meta in field_help().items():
        origin = sources.get(key, "default")
        print(f"{key:<{width}}  {values[key]!r:<28}  [{origin}]  {meta['help']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraloop", description="Train LoRAs for Stable Diffusion 1.x/2.x/XL.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (the origin article's keys; see README)")
    p.add_argument("--resume", help="continue from a <name>-state.pt written by an earlier run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output LoRA of the same name")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="teach the built-in demo model a new concept and show it (CPU, ~2 minutes)")
    p.add_argument("--output", default="loraloop-demo", help="output folder (default: ./loraloop-demo)")
    p.add_argument("--picture", help="also copy the sample grid here (how docs/demo.png is made)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check-dataset", help="report every problem of a dataset folder without training")
    p.add_argument("dir", help="folder of training images")
    p.add_argument("--metadata", help="metadata.csv (filename,prompt) or metadata.jsonl")
    p.add_argument("--recursive", action="store_true", help="also scan sub-folders")
    p.add_argument("--config", help="take the dataset options (resolution, buckets, captions) from this YAML config")
    p.add_argument("--resolution", type=int, help="training resolution for the bucket table (default 512)")
    p.add_argument("--trigger-word", default="", help="trigger word, for caption coverage")
    p.add_argument("--fast", action="store_true", help="read image headers only (skip full decoding)")
    p.set_defaults(func=cmd_check_dataset)

    p = sub.add_parser("config", help="show the effective config with defaults and where each value came from")
    p.add_argument("--explain", dest="file", required=True, help="YAML config file")
    p.set_defaults(func=cmd_config)

    from .plan import add_plan_parser

    add_plan_parser(sub)
    from .caption import add_caption_parser

    add_caption_parser(sub)
    from .resize import add_resize_parser
    add_resize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `loraloop check-dataset … | head` should not end in a traceback
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LoraLoopError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
