"""LoRA Loop's ComfyUI nodes, V3 style: a schema plus a thin `execute` that calls the modules beside this one.

Node ids carry the `LoRALoop_` prefix: ComfyUI silently drops a custom node whose id equals a built-in one
(`SaveLoRA`, `TrainLoraNode`, … exist in core). Display names are the design's names.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import yaml

from ..trainer.caption_settings import STYLES
from ..trainer.config import field_help
from ..trainer.errors import ConfigError, DatasetError
from ..trainer.lorafile import atomic_write
from ..trainer.widgets import read_yaml, values_from_mapping
from . import paths
from .compat import ComfyExtension, LoraModelType, io, ui
from .datasets import (
    CAPTION_SOURCE_HELP,
    CAPTION_SOURCES,
    CAPTIONER_PREFIX,
    PREVIEW_SIZE,
    ComfyDataset,
    caption_dataset,
    captioner_names,
    preview_batch,
)
from .widgets import NodeConfig, default_node_config, node_config, node_schema, widget_inputs

log = logging.getLogger(__name__)

CATEGORY = "LoRA Loop"
PREFIX = "LoRALoop_"
Dataset = io.Custom("LORALOOP_DATASET")
Config = io.Custom("LORALOOP_CONFIG")
# TrainLoRA's preview after training: a cheap sample by default (the run's periodic samples use sample_steps).
PREVIEW_STEPS = 8
PREVIEW_STEPS_MAX = int(field_help()["sample_steps"]["max"])


def _one(value: Any) -> Any:
    """Unpack a scalar input of an `is_input_list` node (ComfyUI hands every input over as a list there)."""
    return value[0] if isinstance(value, list) and value else value


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadDataset", display_name="LoadDataset", category=CATEGORY, is_output_node=True,
            description="A folder of training images (under ComfyUI's input directory) with its captions, checked.",
            search_aliases=["dataset", "training images", "lora dataset"],
            inputs=[
                io.String.Input("folder", default="my_dataset", tooltip="Folder relative to ComfyUI's input directory "
                                "(or a root registered as loraloop_datasets in extra_model_paths.yaml). kohya N_name "
                                "sub-folders repeat their images N times."),
                io.Boolean.Input("recursive", default=False, tooltip="Also read images in any sub-folder."),
                io.String.Input("caption_extension", default=".txt", tooltip="Extension of caption sidecar files."),
                io.String.Input("metadata_file", default="", optional=True, tooltip="A filename,prompt CSV or "
                                ".jsonl inside the folder whose captions win over sidecars (metadata.csv is found "
                                "automatically)."),
                io.String.Input("trigger_word", default="", optional=True, tooltip="Prepended to every caption that "
                                "lacks it; saved with the LoRA."),
            ],
            # Outputs are linked by index in saved workflows: new ones are appended, never inserted.
            outputs=[Dataset.Output("dataset", display_name="DATASET"),
                     io.String.Output("summary", tooltip="Images, their sizes and caption coverage. Buckets are "
                                      "decided when TrainLoRA runs, from LoRATrainConfig's resolution."),
                     io.Image.Output("images", tooltip=f"The dataset's images as one batch, in file-name order (the "
                                     "order Caption maps `captions` back in), for a captioner node (Florence-2, "
                                     f"JoyCaption, WD14 tagger, Qwen-VL …): each fitted inside {PREVIEW_SIZE}x"
                                     f"{PREVIEW_SIZE} with its aspect ratio kept, centred on black (about 3 MB of "
                                     "memory per image).")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **kwargs: Any) -> str:
        """Re-run when files in the folder change, not only when the inputs do."""
        try:
            root = paths.find_dataset_dir(folder)
        except (DatasetError, ConfigError):
            return folder
        stats = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file())
        return hashlib.sha256(repr((stats, sorted(kwargs.items()))).encode()).hexdigest()

    @classmethod
    def execute(cls, folder: str, recursive: bool, caption_extension: str, metadata_file: str = "",
                trigger_word: str = "") -> io.NodeOutput:
        root = paths.find_dataset_dir(folder)
        metadata = paths.resolve_under(root, metadata_file, "metadata_file") if metadata_file.strip() else None
        dataset = ComfyDataset(folder.strip().strip("/"), root, recursive, caption_extension.strip() or ".txt",
                               metadata, (trigger_word or "").strip())
        report = dataset.report()
        summary = dataset.summary(report)
        if report.will_fail:
            raise DatasetError(summary, path=folder)
        # Always made, even when unconnected: ComfyUI caches a node's outputs by its inputs alone, so an output
        # skipped while unconnected would stay missing after it is connected.
        images = preview_batch(dataset, report.scan.records)
        return io.NodeOutput(dataset, summary, images, ui=ui.PreviewText(summary))


class Caption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Caption", display_name="Caption", category=CATEGORY, is_input_list=True,
            is_output_node=True,
            description="Captions for a DATASET: trigger word, prefix/suffix, find/replace, from the dataset's own "
                        "captions or from strings made by any node. Writes sidecar files only when asked.",
            search_aliases=["captions", "tag images", "trigger word"],
            inputs=[
                Dataset.Input("dataset"),
                io.Combo.Input("source", options=[*CAPTION_SOURCES, *(CAPTIONER_PREFIX + n for n in captioner_names())],
                               default="existing", tooltip=CAPTION_SOURCE_HELP),
                io.String.Input("trigger_word", default="", tooltip="Put first in every caption that lacks it."),
                io.String.Input("prefix", default="", tooltip="Text before each caption (joined with ', ')."),
                io.String.Input("suffix", default="", tooltip="Text after each caption (joined with ', ')."),
                io.String.Input("find", default="", tooltip="Replace this text in every caption (plain text)."),
                io.String.Input("replace", default="", tooltip="…with this."),
                io.Boolean.Input("write_sidecars", default=False, tooltip="Write each caption to <image><ext> next to "
                                 "the image (the dataset's caption_extension)."),
                io.Boolean.Input("overwrite_sidecars", default=False,
                                 tooltip="Allow replacing existing caption files."),
                io.String.Input("captions", optional=True, force_input=True, tooltip="Captions from another node: a "
                                "list with one string per image in LoadDataset's image order (file-name order), one "
                                "string with one line per image, or one string for all."),
                # Appended (and optional): saved workflows without it keep their widget positions.
                io.Combo.Input("style", options=list(STYLES), default="sentence", optional=True,
                               tooltip="With a captioner source: sentence (a description) or tags (comma-separated; "
                               "a vision-language model is asked for tags, a BLIP sentence is split into them)."),
            ],
            outputs=[Dataset.Output("dataset", display_name="DATASET"),
                     io.String.Output("captions", tooltip="The captions, one per line.")],
        )

    @classmethod
    def execute(cls, dataset: list, source: list, trigger_word: list, prefix: list, suffix: list, find: list,
                replace: list, write_sidecars: list, overwrite_sidecars: list,
                captions: list | None = None, style: list | None = None) -> io.NodeOutput:
        new, texts = caption_dataset(
            _one(dataset), source=_one(source), strings=captions, trigger_word=_one(trigger_word),
            prefix=_one(prefix), suffix=_one(suffix), find=_one(find), replace_with=_one(replace),
            write_sidecars=_one(write_sidecars), overwrite=_one(overwrite_sidecars),
            style=_one(style) or "sentence")
        joined = "\n".join(texts)
        return io.NodeOutput(new, joined, ui=ui.PreviewText(joined))


class LoRATrainConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "TrainConfig", display_name="LoRATrainConfig", category=CATEGORY,
            description="Every training option, with the engine's help text. Import a YAML config (values in the file "
                        "win over the widgets) or export the widgets as one.",
            search_aliases=["lora config", "training settings", "yaml config"],
            inputs=[*widget_inputs(io, paths.lora_names()),
                    io.String.Input("import_yaml", default="", optional=True, tooltip="A YAML config under ComfyUI's "
                                    "input directory (CLI format); its values override the widgets."),
                    io.String.Input("export_yaml", default="", optional=True, tooltip="Write the effective options to "
                                    "output/loraloop/<name>.yaml."),
                    *widget_inputs(io, paths.lora_names(), late=True)],
            outputs=[Config.Output("config", display_name="CONFIG"), io.String.Output("yaml")],
        )

    @classmethod
    def execute(cls, import_yaml: str = "", export_yaml: str = "", **widgets: Any) -> io.NodeOutput:
        imported = _read_yaml(import_yaml) if import_yaml.strip() else None
        config = node_config(widgets, imported)
        text = yaml.safe_dump({**config.values, **dict.fromkeys(sorted(config.auto), "auto")}, sort_keys=False,
                              allow_unicode=True)
        if export_yaml.strip():
            target = paths.output_file(export_yaml.strip().removesuffix(".yaml"), ".yaml")
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
        return io.NodeOutput(config, text)


def _read_yaml(name: str) -> dict[str, Any]:
    """Widget values from a YAML config under the input directory, read by the engine (aliases, `key: auto`)."""
    path = paths.input_file(name.strip(), "import_yaml")
    values, notes = values_from_mapping(read_yaml(path.read_text(encoding="utf-8"), name), node_schema(), name)
    for note in notes:
        log.info("LoRA Loop: %s: %s", name, note)
    return values


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "TrainLoRA", display_name="TrainLoRA", category=CATEGORY,
            description="Train a LoRA on the loaded SD1.x/SD2.x/SDXL model (UNet, and the text encoder when "
                        "train_text_encoder is on). The input MODEL/CLIP are handed back unchanged; the LoRA is "
                        "applied to the MODEL/CLIP outputs. Cancel stops within one step.",
            search_aliases=["train lora", "lora training", "fine-tune"],
            inputs=[
                io.Model.Input("model", tooltip="The model to train on (SD1.x, SD2.x incl. v-prediction, SDXL)."),
                io.Clip.Input("clip", tooltip="Encodes the captions (once, unless train_text_encoder is on)."),
                io.Vae.Input("vae", tooltip="Encodes the images once."),
                Dataset.Input("dataset", tooltip="From LoadDataset or Caption."),
                Config.Input("config", optional=True, tooltip="From LoRATrainConfig; node defaults when unconnected."),
                io.String.Input("name", default="my_lora", tooltip="The LoRA's name (metadata, partial saves)."),
                io.Boolean.Input("save_on_cancel", default=True, tooltip="On Cancel, save what was trained so far to "
                                 "models/loras/<name>-cancelled-stepN."),
                # Appended (and optional): saved workflows and API prompts without it keep working.
                io.Int.Input("preview_steps", default=PREVIEW_STEPS, min=0, max=PREVIEW_STEPS_MAX, optional=True,
                             tooltip="Sampler steps of the preview drawn after training from the first sample prompt "
                             "(at sample_cfg, shown with progress): each step runs the UNet twice. 0 = no sample: the "
                             "preview is the loss plot (also without sample prompts). Skipped when this node's MODEL "
                             "output feeds another node: the graph samples it anyway."),
            ],
            outputs=[
                LoraModelType.Output("lora", tooltip="The trained LoRA (kohya keys); SaveLoRA writes it, "
                                     "LoraModelLoader applies it."),
                io.Model.Output("model", tooltip="A clone of MODEL with the LoRA applied."),
                io.Clip.Output("clip", tooltip="A clone of CLIP with the LoRA's text-encoder part applied (if any)."),
                io.Image.Output("loss", tooltip="The loss curve."),
                io.Int.Output("steps", tooltip="Optimizer steps trained."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, model: Any, clip: Any, vae: Any, dataset: ComfyDataset, name: str, save_on_cancel: bool,
                config: NodeConfig | None = None, preview_steps: int = PREVIEW_STEPS) -> io.NodeOutput:
        from .training import loss_image, train_lora

        node_id = cls.hidden.unique_id
        if model_output_is_used(cls.hidden.prompt, node_id):  # the graph samples the trained MODEL anyway
            preview_steps = 0
        run = train_lora(model, clip, vae, dataset, config or default_node_config(), name=name.strip() or "my_lora",
                         node_id=node_id, save_on_cancel=save_on_cancel, preview_steps=int(preview_steps))
        return io.NodeOutput(run.lora, run.model, run.clip, loss_image(run.losses, f"{name}: loss"), run.steps,
                             ui=ui.PreviewText(f"{run.summary}\n\n{run.plan}"))


def model_output_is_used(prompt: Any, node_id: str | None) -> bool:
    """True when another node of the queued prompt takes TrainLoRA's MODEL output (output slot 1): links in the API
    prompt are `[source node id, output index]`."""
    if not isinstance(prompt, dict) or node_id is None:
        return False
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values() if isinstance(node, dict) else ():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id) and value[1] == 1:
                return True
    return False


class MemoryPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "MemoryPlan", display_name="MemoryPlan", category=CATEGORY, is_output_node=True,
            description="What TrainLoRA will do with this model, dataset and config before it trains: memory free "
                        "once ComfyUI unloads the other models, estimated peak, seconds per step and total time, and "
                        "each setting the planner chose (widgets set to 'auto') with the reason. Loads nothing.",
            search_aliases=["vram", "memory", "oom", "plan training"],
            inputs=[
                io.Model.Input("model", tooltip="The model TrainLoRA will train."),
                Dataset.Input("dataset", tooltip="From LoadDataset or Caption."),
                Config.Input("config", optional=True, tooltip="From LoRATrainConfig; node defaults when unconnected."),
            ],
            outputs=[io.String.Output("plan", tooltip="The plan as text.")],
        )

    @classmethod
    def execute(cls, model: Any, dataset: ComfyDataset, config: NodeConfig | None = None) -> io.NodeOutput:
        from .plan import describe_plan

        text = describe_plan(model, dataset, config or default_node_config())
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "SaveLoRA", display_name="SaveLoRA", category=CATEGORY, is_output_node=True,
            description="Save into models/loras (kohya format with metadata) under a unique, sanitized name, with a "
                        "preview PNG and a JSON sidecar holding the trigger words. LoraLoader lists it on the next "
                        "queue.",
            search_aliases=["save lora", "export lora"],
            inputs=[
                LoraModelType.Input("lora", tooltip="From TrainLoRA."),
                io.String.Input("name", default="my_lora", tooltip="File name (sanitized; _2, _3 … added when taken)."),
                io.String.Input("subfolder", default="", optional=True, tooltip="Sub-folder of models/loras."),
                io.Image.Input("preview", optional=True, tooltip="Preview image (default: the run's sample or loss "
                               "curve)."),
                io.String.Input("trigger_words", default="", optional=True, tooltip="Comma-separated; default: the "
                                "dataset's trigger word."),
            ],
            outputs=[io.String.Output("lora_name", tooltip="The name LoraLoader lists.")],
        )

    @classmethod
    def execute(cls, lora: dict, name: str, subfolder: str = "", preview: Any = None,
                trigger_words: str = "") -> io.NodeOutput:
        from .outputs import save_trained_lora

        saved = save_trained_lora(lora, name, subfolder=subfolder, preview=preview, trigger_words=trigger_words)
        return io.NodeOutput(saved.name, ui=ui.PreviewText(f"saved {saved.name} in models/loras"))


class ResizeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from .widgets import NO_LORA

        return io.Schema(
            node_id=PREFIX + "ResizeLoRA", display_name="ResizeLoRA", category=CATEGORY, is_output_node=True,
            description="A LoRA at a new rank per module, from the SVD of each module's update: keep a share of its "
                        "energy, cap the rank, or fit a file size. Reports per module and overall the kept energy "
                        "and the relative error of the update. One alpha for every module, the rest of each scale in "
                        "its tensors: the LoRA loads at the same strength. LoHa/LoKr/DoRA are refused.",
            search_aliases=["resize lora", "shrink lora", "lora rank", "svd", "prune lora"],
            inputs=[
                io.Combo.Input("mode", options=["energy", "rank", "max_mb"], default="energy",
                               tooltip="energy: keep this share of each module's singular-value energy (0-1, e.g. "
                               "0.95; 1 = lossless). rank: at most this rank per module (e.g. 8). max_mb: each "
                               "module's rank chosen so the file is at most this many MB (greedy by energy per byte)."),
                io.Float.Input("value", default=0.95, min=0.0001, max=100000.0, step=0.01, round=False,
                               tooltip="The energy share, the rank or the size in MB (1 MB = 1,000,000 bytes), as "
                               "mode says."),
                LoraModelType.Input("lora", optional=True, tooltip="From TrainLoRA; wins over lora_name."),
                io.Combo.Input("lora_name", options=[NO_LORA, *paths.lora_names()], default=NO_LORA, optional=True,
                               tooltip="A LoRA from models/loras to resize (when no LORA_MODEL is connected)."),
                io.String.Input("save_as", default="", optional=True, tooltip="Also save the result into "
                                "models/loras under this name (sanitized, _2, _3 … when taken); empty: do not save."),
            ],
            outputs=[LoraModelType.Output("lora", tooltip="The resized LoRA; SaveLoRA writes it, LoraModelLoader "
                                          "applies it."),
                     io.String.Output("report", tooltip="Ranks, kept energy and relative error per module, then "
                                      "overall, and the size before and after.")],
        )

    @classmethod
    def execute(cls, mode: str, value: float, lora: Any = None, lora_name: str = "",
                save_as: str = "") -> io.NodeOutput:
        from ..trainer.lorafile import load_lora, save_lora, unique_path
        from ..trainer.resize import Target, resize_state_dict
        from .outputs import save_trained_lora
        from .training import TrainedLora
        from .widgets import NO_LORA

        if lora is not None:
            tensors, metadata, source = dict(lora), dict(getattr(lora, "metadata", {}) or {}), "the connected LoRA"
        elif lora_name and lora_name != NO_LORA:
            path = paths.find_lora(lora_name)
            (tensors, metadata), source = load_lora(path), path.name
        else:
            raise ConfigError("ResizeLoRA: connect a LORA_MODEL (from TrainLoRA) or pick a lora_name to resize",
                              key="lora")
        resized = resize_state_dict(tensors, metadata, Target(mode, value), source=source)
        words = getattr(lora, "trigger_words", None)
        if words is None:
            words = [w.strip() for w in metadata.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
        out = TrainedLora(resized.tensors, resized.metadata, list(words), getattr(lora, "preview", None),
                          getattr(lora, "family", ""))
        text = resized.report.text()
        if save_as.strip():
            if all(k.startswith(("lora_unet_", "lora_te")) for k in out):  # as SaveLoRA: card and preview beside it
                saved = save_trained_lora(out, save_as)
                name = saved.name
            else:  # diffusers/peft names: the file alone, as it came
                folder, stem = paths.lora_target(save_as)
                path = save_lora(unique_path(folder, stem), dict(out), out.metadata)
                paths.invalidate_lora_list()
                name = path.relative_to(paths.loras_dir()).as_posix()
            text += f"\nsaved {name} in models/loras"
        return io.NodeOutput(out, text, ui=ui.PreviewText(text))


class LoRAPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoRAPrompt", display_name="LoRAPrompt", category=CATEGORY,
            description="A prompt that understands <lora:name:0.8> tags: they are removed from the text and those "
                        "LoRAs are applied to the MODEL/CLIP outputs; the rest is encoded.",
            search_aliases=["lora tags", "prompt with lora", "<lora:"],
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="Prompt with optional "
                                "<lora:name>, <lora:name:weight> or <lora:name:unet_weight:te_weight> tags."),
            ],
            outputs=[io.Conditioning.Output("conditioning"), io.Model.Output("model"), io.Clip.Output("clip"),
                     io.String.Output("text", tooltip="The prompt without the tags.")],
        )

    @classmethod
    def execute(cls, model: Any, clip: Any, text: str) -> io.NodeOutput:
        from .prompt import apply_lora_tags, encode, parse_lora_tags

        clean, tags = parse_lora_tags(text)
        model, clip = apply_lora_tags(model, clip, tags)
        return io.NodeOutput(encode(clip, clean), model, clip, clean)


NODES: list[type] = [LoadDataset, Caption, LoRATrainConfig, MemoryPlan, TrainLoRA, SaveLoRA, ResizeLoRA, LoRAPrompt]


class LoRALoopExtension(ComfyExtension):
    async def get_node_list(self) -> list[type]:
        return list(NODES)


async def comfy_entrypoint() -> LoRALoopExtension:
    return LoRALoopExtension()


