"""`loraloop caption`: caption a folder of images with a local image-to-text model, as sidecar files.

    loraloop caption data/style --model models/blip-image-captioning-large [--style tags] [--trigger-word sks]

Images that already have a caption file are kept unless `--overwrite`; each file is written atomically as soon as its
batch is captioned, so a Ctrl-C keeps what was done and a re-run continues with the rest. The model is loaded only
when something needs a caption and released afterwards. `cli/__init__.py` registers it with `add_caption_parser(sub)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..trainer.caption_settings import BATCH_SIZE, MAX_NEW_TOKENS, STYLES


def add_caption_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `loraloop caption` on the CLI's sub-parsers."""
    p = subparsers.add_parser("caption", help="write caption files for a folder of images with a local "
                                              "image-to-text model (BLIP, or a vision-language model)")
    p.add_argument("dir", help="folder of images")
    p.add_argument("--model", required=True, help="folder of a transformers image-to-text model (config.json, "
                                                  "weights, processor), e.g. a downloaded BLIP captioning model")
    p.add_argument("--style", choices=STYLES, default="sentence",
                   help="sentence: a description; tags: comma-separated tags (default: sentence)")
    p.add_argument("--trigger-word", default="", help="put first in every caption (unless the caption has it)")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 … (default: the GPU when there is one)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"images per batch (default {BATCH_SIZE})")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help=f"longest caption, in tokens (default {MAX_NEW_TOKENS})")
    p.add_argument("--prompt", help="what a vision-language model is asked (default: one for --style); BLIP "
                                    "takes no prompt")
    p.set_defaults(func=cmd_caption)
    return p


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption the folder; exit 0 when every image has a caption afterwards, 1 when some could not be read."""
    from tqdm import tqdm

    from ..trainer.captioner import caption_folder

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="captioning", unit="image", dynamic_ncols=True, file=sys.stderr)
        bar.update(done - bar.n)

    try:
        result = caption_folder(Path(args.dir), Path(args.model), style=args.style, trigger_word=args.trigger_word,
                                overwrite=args.overwrite, recursive=args.recursive, extension=args.caption_extension,
                                batch_size=args.batch_size, device=args.device, prompt=args.prompt,
                                max_new_tokens=args.max_new_tokens, progress=progress)
    except KeyboardInterrupt:
        print("cancelled; the caption files written so far are kept (run again to continue)", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    print(result.summary())
    return 1 if result.problems else 0
