"""Mirrors modules/sd_models.py `model_data` (the loaded model, without loading one) and `CheckpointInfo`'s fields."""

from pathlib import Path


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = Path(filename).name
        self.name_for_extra = Path(filename).stem
        self.model_name = self.name_for_extra
        self.hash = None
        self.shorthash = "0123456789"
        self.title = f"{self.name} [{self.shorthash}]"


class _ModelData:
    @property
    def sd_model(self):
        from modules import shared

        return shared.sd_model


model_data = _ModelData()
