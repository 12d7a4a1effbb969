"""Exceptions the engine raises. Every message names the file/field at fault and what to do about it."""

from __future__ import annotations

from pathlib import Path


class LoraLoopError(Exception):
    """Root of every error LoRA Loop raises on purpose."""


class ConfigError(LoraLoopError, ValueError):
    """A config key has a bad value. `key`, `value` and `allowed` let front ends highlight the field."""

    def __init__(self, msg: str, *, key: str | None = None, value: object = None, allowed: object = None) -> None:
        super().__init__(msg)
        self.key = key
        self.value = value
        self.allowed = allowed


class DatasetError(LoraLoopError):
    """The dataset cannot be used. `path` names the file or folder at fault."""

    def __init__(self, msg: str, *, path: str | Path | None = None) -> None:
        super().__init__(msg)
        self.path = None if path is None else Path(path)


class UnsupportedModelError(LoraLoopError):
    """The model (checkpoint, host object) is of a family the engine cannot train."""


class LoraFileError(LoraLoopError):
    """A LoRA file cannot be read, written or applied. `path` names it."""

    def __init__(self, msg: str, *, path: str | Path | None = None) -> None:
        super().__init__(msg)
        self.path = None if path is None else Path(path)


class MissingDependencyError(LoraLoopError, ImportError):
    """An optional package is needed for the chosen setting. The message says how to install it."""


class NonFiniteLossError(LoraLoopError):
    """The loss or the adapter weights became NaN/inf; nothing broken was saved."""

    def __init__(self, msg: str, *, step: int) -> None:
        super().__init__(msg)
        self.step = step


class TrainingInterrupted(LoraLoopError):
    """The user cancelled. `step` is the number of optimizer steps completed."""

    def __init__(self, msg: str = "training cancelled", *, step: int = 0) -> None:
        super().__init__(msg)
        self.step = step


class OutOfMemory(LoraLoopError):
    """A run does not fit, or ran out of device memory and the recovery ladder could not help; the message says what
    would fit or what to lower. Hosts raise it before touching the model or after restoring it."""
