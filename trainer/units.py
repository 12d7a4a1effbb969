"""Units and how durations are written, defined once for the engine and every front end (no torch, no PIL)."""

from __future__ import annotations

GIB = 1024**3  # what GPU tools call a GB


def fmt_eta(seconds: float) -> str:
    """A countdown as progress bars show it: `m:ss`, or `h:mm:ss` from an hour on."""
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def fmt_duration(seconds: float) -> str:
    """A rough length for an estimate (`40 s`, `12 min`, `2.5 h`): more digits would promise a precision it lacks."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
