"""What a captioning run can be asked for, without importing torch: the command line builds its options from these
(`loraloop config --explain` and `--help` must stay cheap), `captioner.py` runs them."""

STYLES = ("sentence", "tags")
MAX_NEW_TOKENS = 60  # the longest caption, in tokens
BATCH_SIZE = 4  # images per model call
