"""`loraloop resize`: a LoRA file at a new rank per module, chosen by kept energy, a fixed rank or a file size.

    loraloop resize in.safetensors out.safetensors --energy 0.95
    loraloop resize in.safetensors out.safetensors --rank 8
    loraloop resize in.safetensors out.safetensors --max-mb 20 [--precision fp16] [--overwrite] [--summary | --json]

Prints, per module and overall, the rank before and after, the kept singular-value energy and the relative error of
ΔW. The maths and the report live in `trainer/resize.py`; `cli/__init__.py` registers this with `add_resize_parser`.
"""

from __future__ import annotations

import argparse
import json

from ..trainer.config import SAVE_PRECISIONS


def add_resize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `loraloop resize` on the CLI's sub-parsers."""
    p = subparsers.add_parser("resize", help="resize a LoRA file: a rank per module by kept energy, rank or file size",
                              description="Write a LoRA at a new rank per module (SVD of each module's update). "
                              "alpha is set to the new rank and the old alpha/rank scale is baked into the tensors, "
                              "so the file loads at the same strength everywhere.")
    p.add_argument("input", help="LoRA .safetensors (kohya or diffusers/peft names; LoRA or LoCon)")
    p.add_argument("output", help="where to write the resized LoRA (refused when it exists, unless --overwrite)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--energy", type=float, help="keep this share of each module's singular-value energy, "
                        "e.g. 0.95 (1.0: lossless)")
    target.add_argument("--rank", type=int, help="at most this rank in every module, e.g. 8")
    target.add_argument("--max-mb", type=float, help="choose each module's rank so the file is at most this many MB "
                        "(1 MB = 1,000,000 bytes)")
    p.add_argument("--precision", choices=SAVE_PRECISIONS, help="dtype of the written tensors (default: the "
                   "input's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--summary", action="store_true", help="print only the overall lines, not every module")
    shown.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_resize)
    return p


def cmd_resize(args: argparse.Namespace) -> int:
    from ..trainer.resize import Target, resize_file

    if args.energy is not None:
        target = Target("energy", args.energy)
    elif args.rank is not None:
        target = Target("rank", args.rank)
    else:
        target = Target("max_mb", args.max_mb)
    report = resize_file(args.input, args.output, target, precision=args.precision, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary() if args.summary else report.text())
    return 0
