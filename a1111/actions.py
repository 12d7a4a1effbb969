"""What the tab's buttons do, without Gradio: each takes the field values in `names` order and returns plain values.

`ui.py` lays the widgets out and wires them to these; the tests call them directly. Only `train` is a GPU job: the tab
wraps it with the webui's `wrap_gradio_gpu_call` (queue lock shared with txt2img, state.begin/end, progress id).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from ..trainer.errors import ConfigError, LoraLoopError
from ..trainer.lorafile import atomic_write, sanitize_name
from ..trainer.plot import loss_curve
from . import captions, forge, plan, training, webui, widgets
from .bundle import WebuiBundle, describe
from .sink import LIVE

log = logging.getLogger(__name__)

UNCHANGED = object()  # an import leaves this field as it is


def error_html(err: BaseException) -> str:
    key = getattr(err, "key", None)
    where = f" <b>{html.escape(str(key))}</b>:" if key else ""
    return f"<div class='error'>LoRA Loop:{where} {html.escape(str(err))}</div>"


def model_info() -> str:
    """A line about the loaded model (never loads one)."""
    model = webui.loaded_model()
    if model is None:
        return "No model loaded yet: the checkpoint selected at the top of the page is loaded when training starts."
    try:
        return "Training on the loaded model: " + describe(model).label
    except LoraLoopError as err:
        return f"The loaded model cannot be trained: {err}"


class TabActions:
    """The tab's handlers for the fields `names` (in widget order)."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)

    def values(self, args: tuple) -> dict[str, Any]:
        if len(args) != len(self.names):
            raise ValueError(f"expected {len(self.names)} field values, got {len(args)}")
        return dict(zip(self.names, args, strict=True))

    # -- training ---------------------------------------------------------------------------------------------------
    def train(self, id_task: str, *args: Any) -> tuple[Image.Image | None, Image.Image | None, str]:
        """(loss plot, preview image, result html); run under the webui's GPU queue wrapper."""
        try:
            result = training.run_training(self.values(args))
        except LoraLoopError as err:
            log.warning("LoRA Loop: %s", err)
            snapshot = LIVE.snapshot()
            plot = loss_curve(snapshot["losses"], title="loss") if snapshot["losses"] else None
            return plot, None, error_html(err)
        return result.loss_plot, result.preview, result.html()

    def train_job(self):  # noqa: ANN201 - the webui's wrapped callable
        return webui.wrap_gpu_call(self.train, extra_outputs=[None, None])

    @staticmethod
    def cancel() -> str:
        """The webui's own interrupt: the run stops after the current step, saves what it has and restores the model.
        Only while a LoRA Loop run is going (the flag is global: it would also stop another tab's generation)."""
        if not LIVE.snapshot()["running"]:
            return "No training is running."
        webui.state().interrupt()
        return "Cancelling after the current step…"

    @staticmethod
    def live() -> tuple[str, Image.Image | None]:
        snap = LIVE.snapshot()
        if not snap["name"]:
            return "No run yet.", None
        plot = loss_curve(snap["losses"], title=f"{snap['name']}: loss") if snap["losses"] else None
        return snap["text"], plot

    # -- dataset ----------------------------------------------------------------------------------------------------
    def check_dataset(self, *args: Any) -> str:
        try:
            text, _ = training.check_dataset_text(self.values(args))
        except LoraLoopError as err:
            return f"ERROR: {err}"
        return text

    def _caption_changes(self, args: tuple) -> tuple[list[captions.CaptionChange], Path]:
        *field_args, prefix, suffix, find, replace, regex, add_trigger = args
        config = widgets.dataset_config(self.values(tuple(field_args)))
        from ..trainer.batches import dataset_options

        options = dataset_options(config)
        edit = captions.CaptionEdit(prefix or "", suffix or "", find or "", replace or "", bool(regex),
                                    bool(add_trigger))
        return captions.plan_captions(options, edit), options.train_data_dir

    def preview_captions(self, *args: Any) -> str:
        try:
            changes, root = self._caption_changes(args)
        except LoraLoopError as err:
            return f"ERROR: {err}"
        return captions.preview_text(changes, root)

    def write_captions(self, *args: Any) -> str:
        try:
            changes, root = self._caption_changes(args)
            written, skipped = captions.write_captions(changes)
        except LoraLoopError as err:
            return f"ERROR: {err}"
        lines = [f"Wrote {len(written)} caption file(s) in {root}."]
        if skipped:
            lines.append(f"{len(skipped)} not written: {skipped[0].reason}")
        return "\n".join(lines)

    def caption_with(self, *args: Any) -> tuple[str, str]:
        """(proposals, status): the chosen interrogator's captions for the images without one (all with overwrite),
        with the caption edit applied. Runs in the webui's GPU queue; writes nothing (see `write_proposed`)."""
        *edit_args, interrogator, overwrite = args
        *field_args, prefix, suffix, find, replace, regex, add_trigger = edit_args
        choice = captions.INTERROGATORS.get(interrogator, interrogator)
        if choice not in webui.INTERROGATORS:
            return "", f"ERROR: choose what to caption with: {', '.join(captions.INTERROGATORS)}"
        try:
            from ..trainer.batches import dataset_options

            options = dataset_options(widgets.dataset_config(self.values(tuple(field_args))))
            edit = captions.CaptionEdit(prefix or "", suffix or "", find or "", replace or "", bool(regex),
                                        bool(add_trigger))
            with webui.gpu_queue():
                run = captions.propose_captions(options, edit, webui.INTERROGATORS[choice], overwrite=bool(overwrite),
                                                stopped=lambda: bool(webui.state().interrupted))
        except LoraLoopError as err:
            return "", f"ERROR: {err}"
        return run.text(), run.status()

    def write_proposed(self, *args: Any) -> str:
        """Write the (edited) proposals as sidecar files: the confirmation step of `caption_with`."""
        *field_args, proposals, overwrite = args
        try:
            from ..trainer.batches import dataset_options

            options = dataset_options(widgets.dataset_config(self.values(tuple(field_args))))
            root, targets = captions.dataset_targets(options)
            pairs = captions.parse_proposals(proposals or "", root, targets)
            if not pairs:
                return "Nothing to write: caption the images first (or type '<image>: <caption>' lines)."
            written, notes = captions.write_proposals(pairs, overwrite=bool(overwrite))
        except LoraLoopError as err:
            return f"ERROR: {err}"
        return "\n".join([f"Wrote {len(written)} caption file(s) in {root}.", *notes])

    # -- plan -------------------------------------------------------------------------------------------------------
    def plan(self, *args: Any) -> str:
        try:
            values = self.values(args)
            model = webui.loaded_model()
            bundle = None
            if model is None:
                config = widgets.unresolved_config(widgets.parse_values(values), training.native_resolution())
                facts = None
            else:
                facts = describe(model)
                config = widgets.resolve(widgets.parse_values(values), facts.family, facts.prediction_type, facts.dtype)
                bundle = forge.ForgeBundle(model) if forge.detected(model) else WebuiBundle(model,
                                                                                            webui.compute_device())
            from ..trainer.batches import dataset_options
            from ..trainer.data import TrainDataset

            dataset = TrainDataset.from_options(dataset_options(config), seed=config.seed)
            lines = plan.run_plan_lines(config, text_encoder_trainable=bool(facts and facts.text_encoder_trainable),
                                        lowvram=bool(getattr(model, "lowvram", False)),
                                        xattention=bool(webui.option("training_xattention_optimizations", False)),
                                        dataset=dataset)
            lines += ["", plan.memory_plan_text(config, bundle, dataset)]
        except LoraLoopError as err:
            return f"ERROR: {err}"
        return "\n".join(lines)

    # -- config import / export -------------------------------------------------------------------------------------
    def export_yaml(self, *args: Any) -> tuple[str, str | None, str]:
        """(YAML text, path of the written file, note)."""
        values = self.values(args)
        settings = widgets.parse_values(values)
        model = webui.loaded_model()
        try:
            try:
                facts = describe(model) if model is not None else None
            except LoraLoopError:
                facts = None
            if facts is None:
                text = widgets.export_unresolved(settings)
                note = "No trainable model loaded: 'auto' values are left to the CLI."
            else:
                config = widgets.resolve(settings, facts.family, facts.prediction_type, facts.dtype,
                                      base_model=webui.checkpoint_file(model))
                text = widgets.export_yaml(config)
                note = f"Resolved for the loaded model ({facts.family.name})."
        except LoraLoopError as err:
            return "", None, f"ERROR: {err}"
        name = sanitize_name(str(values.get("output_name") or "lora"))
        path = atomic_write(webui.work_dir() / "configs" / f"{name}.yaml",
                            lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
        return text, str(path), f"{note} Saved {path}."

    def import_yaml(self, text: str) -> tuple[list[Any], str]:
        """Field values from YAML text: (one value or UNCHANGED per field, note)."""
        if not (text or "").strip():
            return [UNCHANGED] * len(self.names), "Paste a YAML config first."
        try:
            values, notes = widgets.values_from_yaml(text)
        except ConfigError as err:
            return [UNCHANGED] * len(self.names), f"ERROR: {err}"
        return self._updates(values, notes)

    def import_file(self, file: Any) -> tuple[list[Any], str]:
        path = getattr(file, "name", file)
        if isinstance(file, dict):
            path = file.get("path") or file.get("name")
        if not path:
            return [UNCHANGED] * len(self.names), "Choose a .yaml or .toml file first."
        try:
            values, notes = widgets.values_from_file(path)
        except ImportError as err:  # .toml needs tomllib (Python 3.11+); the webui runs 3.10
            return [UNCHANGED] * len(self.names), f"ERROR: cannot read TOML here ({err}); use a .yaml config"
        except (ConfigError, OSError) as err:
            return [UNCHANGED] * len(self.names), f"ERROR: {err}"
        return self._updates(values, notes)

    def _updates(self, values: dict[str, Any], notes: list[str]) -> tuple[list[Any], str]:
        updates = [values.get(name, UNCHANGED) for name in self.names]
        applied = sum(1 for u in updates if u is not UNCHANGED)
        return updates, "; ".join([f"Imported {applied} setting(s)", *notes])


# -- resize ------------------------------------------------------------------------------------------------------------
# The tab's target choices → trainer.resize target modes.
RESIZE_TARGETS = {"energy kept (0-1, e.g. 0.95)": "energy", "rank (at most, e.g. 8)": "rank",
                  "file size (MB, e.g. 20)": "max_mb"}


def lora_files() -> list[str]:
    """The .safetensors LoRAs in the Lora folder (sub-folders too), relative to it: the resize picker's choices."""
    root = webui.lora_dir()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors") if p.is_file())


def resize_lora(name: str, target: str, value: float | None, output_name: str, overwrite: bool) -> str:
    """Resize the Lora-folder LoRA `name` into `<output_name>.safetensors` in the Lora folder: the report, or the error.
    The webui's LoRA list is refreshed, so `<lora:output_name:1>` works at once."""
    from ..trainer.resize import Target, resize_file

    try:
        root = webui.lora_dir().resolve()
        source = (root / (name or "")).resolve()
        if not name or root not in source.parents or not source.is_file():
            msg = f"no LoRA {name or ''!r} in {root}: press Refresh list and pick one"
            raise ConfigError(msg, key="lora", value=name)
        stem = sanitize_name((output_name or "").strip().removesuffix(".safetensors"), f"{source.stem}_resized")
        goal = Target(RESIZE_TARGETS.get(target, target), float(value or 0))
        report = resize_file(source, root / f"{stem}.safetensors", goal, overwrite=bool(overwrite))
    except LoraLoopError as err:
        return f"ERROR: {err}"
    webui.refresh_networks()
    return report.text()
