"""The "LoRA Loop" tab (Gradio): layout and wiring only; the work is in `actions`, the fields come from `widgets`
(the engine's widget schema as the tab shows it).

Works with the webui's Gradio 3.41 (AUTOMATIC1111) and Gradio 4.40 (Forge): only components and arguments both
have are used, the JavaScript hook is passed as `_js` (3.x) or `js` (4.x), and hidden helpers are hidden with CSS
(Gradio 4 does not render invisible components, so JavaScript could not click them).
"""

from __future__ import annotations

import html
import json
from typing import Any

from . import actions, captions, webui, widgets

TAB_TITLE = "LoRA Loop"
TAB_ID = "loraloop"


def _js(name: str) -> dict[str, str]:
    import gradio as gr

    major = int(str(getattr(gr, "__version__", "3")).split(".")[0] or 3)
    return {"js" if major >= 4 else "_js": name}


def _widget(f: widgets.Field) -> Any:
    """The Gradio component of one field (a schema widget as the tab shows it: see `widgets.TAB_KINDS`)."""
    import gradio as gr

    elem_id = f"loraloop_{f.name}"
    if f.kind == "bool":
        return gr.Checkbox(label=f.name, value=f.default, elem_id=elem_id)
    if f.kind == "choice":
        return gr.Dropdown(label=f.name, choices=list(f.choices or ()), value=f.default, elem_id=elem_id)
    if f.kind in ("int", "float"):  # the schema's bounds: Gradio refuses a value outside them when the tab is used
        return gr.Number(label=f.name, value=f.default, precision=0 if f.kind == "int" else None, minimum=f.minimum,
                         maximum=f.maximum, elem_id=elem_id)
    if f.kind == "lines":
        return gr.Textbox(label=f.name, value=f.default, lines=3, elem_id=elem_id)
    return gr.Textbox(label=f.name, value=f.default, lines=1, elem_id=elem_id)


def _grid(fields: list[widgets.Field], components: dict[str, Any], per_row: int = 4) -> None:
    import gradio as gr

    for start in range(0, len(fields), per_row):
        with gr.Row():
            for f in fields[start : start + per_row]:
                components[f.name] = _widget(f)


def build_tab() -> Any:
    """The tab's gr.Blocks; field widgets are labelled with their config key, hover help comes from field_help()."""
    import gradio as gr

    work_dir = webui.work_dir()
    fields = widgets.form_fields(work_dir)
    by_name = {f.name: f for f in fields}
    components: dict[str, Any] = {}
    hints = html.escape(json.dumps(widgets.tooltips(work_dir)))

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.HTML(f"<div id='loraloop_hints' style='display:none'>{hints}</div>")
        with gr.Row():
            model_md = gr.Markdown(actions.model_info, elem_id="loraloop_model")  # evaluated on every page load
            model_refresh = gr.Button("Refresh model info", elem_id="loraloop_model_refresh")

        gr.Markdown("### 1. Dataset")
        _grid([by_name[n] for n in widgets.DATASET_FIELDS], components, per_row=5)
        with gr.Row():
            check_button = gr.Button("Check dataset", elem_id="loraloop_check")
        report = gr.Textbox(label="Dataset check", lines=12, interactive=False, elem_id="loraloop_report")
        with gr.Accordion("Caption tools", open=False):
            gr.Markdown("Preview first; caption files (the `caption_extension` sidecars) are only written when you "
                        "press Write. Captions from metadata.csv/.jsonl are not touched.")
            with gr.Row():
                prefix = gr.Textbox(label="prefix", placeholder="e.g. 'photo of sks, '", elem_id="loraloop_cap_prefix")
                suffix = gr.Textbox(label="suffix", elem_id="loraloop_cap_suffix")
                find = gr.Textbox(label="find", elem_id="loraloop_cap_find")
                replace = gr.Textbox(label="replace with", elem_id="loraloop_cap_replace")
            with gr.Row():
                regex = gr.Checkbox(label="find is a regular expression", value=False, elem_id="loraloop_cap_regex")
                add_trigger = gr.Checkbox(label="also write the trigger word into the files", value=False,
                                          elem_id="loraloop_cap_trigger")
                preview_caps = gr.Button("Preview captions", elem_id="loraloop_cap_preview")
                write_caps = gr.Button("Write caption files", variant="stop", elem_id="loraloop_cap_write")
            caption_out = gr.Textbox(label="Captions", lines=10, interactive=False, elem_id="loraloop_cap_out")
            gr.Markdown("**Caption with** the webui's own interrogators (img2img's Interrogate CLIP / DeepBooru: same "
                        "models, same Settings → Interrogate options; the webui loads them, fetching them on first "
                        "use): images without a caption file get one proposed (all with overwrite), with the edit "
                        "above applied. Read and edit the proposals, then write them.")
            with gr.Row():
                interrogator = gr.Dropdown(label="Caption with", choices=list(captions.INTERROGATORS),
                                           value=next(iter(captions.INTERROGATORS)),
                                           elem_id="loraloop_cap_interrogator")
                overwrite_caps = gr.Checkbox(label="overwrite existing caption files", value=False,
                                             elem_id="loraloop_cap_overwrite")
                auto_caps = gr.Button("Caption images", elem_id="loraloop_cap_auto")
                write_proposed = gr.Button("Write these captions", variant="stop",
                                           elem_id="loraloop_cap_write_proposed")
            proposals = gr.Textbox(label="Proposed captions: one '<image>: <caption>' line per image, editable",
                                   lines=12, interactive=True, elem_id="loraloop_cap_proposals")

        gr.Markdown("### 2. Settings")
        for group, title in widgets.groups(fields).items():
            group_fields = [f for f in fields if f.group == group and f.name not in widgets.DATASET_FIELDS]
            with gr.Accordion(title, open=group in ("network", "training")):
                _grid(group_fields, components)
        with gr.Accordion("Import / export config", open=False):
            with gr.Row():
                config_file = gr.File(label="Config file (.yaml, .toml)", file_types=[".yaml", ".yml", ".toml"],
                                      elem_id="loraloop_config_file")
                exported = gr.File(label="Exported config", interactive=False, elem_id="loraloop_config_exported")
            yaml_text = gr.Textbox(label="YAML", lines=10, elem_id="loraloop_yaml")
            with gr.Row():
                import_file = gr.Button("Import file", elem_id="loraloop_import_file")
                import_text = gr.Button("Apply YAML", elem_id="loraloop_import_yaml")
                export = gr.Button("Export YAML", elem_id="loraloop_export")
            config_note = gr.Markdown("", elem_id="loraloop_config_note")

        gr.Markdown("### 3. Plan")
        plan_button = gr.Button("Show plan", elem_id="loraloop_plan_button")
        plan_out = gr.Textbox(label="Plan", lines=8, interactive=False, elem_id="loraloop_plan")

        gr.Markdown("### 4. Train")
        with gr.Row():
            train = gr.Button("Train", variant="primary", elem_id="loraloop_train")
            cancel = gr.Button("Cancel", elem_id="loraloop_cancel")
        task_id = gr.Textbox(value="", visible=False, elem_id="loraloop_task_id")
        live_refresh = gr.Button("refresh", elem_id="loraloop_refresh_live")
        with gr.Row():
            with gr.Column():
                gr.HTML("<div id='loraloop_progressbar'></div>", elem_id="loraloop_progress")
                live_text = gr.Textbox(label="Status", interactive=False, elem_id="loraloop_status")
                live_plot = gr.Image(label="Loss (live)", type="pil", interactive=False, elem_id="loraloop_live_loss")
                gr.HTML("<div id='loraloop_gallery_inner'></div>", elem_id="loraloop_gallery")
            with gr.Column():
                loss_plot = gr.Image(label="Loss", type="pil", interactive=False, elem_id="loraloop_loss")
                preview = gr.Image(label="Preview (<name>.preview.png)", type="pil", interactive=False,
                                   elem_id="loraloop_preview")
                result = gr.HTML(elem_id="loraloop_result")

        gr.Markdown("### 5. Resize a LoRA")
        with gr.Accordion("A LoRA of the Lora folder at a new rank per module: by kept energy, rank or file size",
                          open=False):
            with gr.Row():
                resize_source = gr.Dropdown(label="LoRA", choices=actions.lora_files(), elem_id="loraloop_resize_lora")
                resize_refresh = gr.Button("Refresh list", elem_id="loraloop_resize_refresh")
                resize_target = gr.Dropdown(label="target", choices=list(actions.RESIZE_TARGETS),
                                            value=next(iter(actions.RESIZE_TARGETS)), elem_id="loraloop_resize_target")
                resize_value = gr.Number(label="value", value=0.95, elem_id="loraloop_resize_value")
            with gr.Row():
                resize_name = gr.Textbox(label="output name (in the Lora folder)", placeholder="<name>_resized",
                                         elem_id="loraloop_resize_name")
                resize_overwrite = gr.Checkbox(label="overwrite", value=False, elem_id="loraloop_resize_overwrite")
                resize_button = gr.Button("Resize", elem_id="loraloop_resize_button")
            resize_report = gr.Textbox(label="Resize report", lines=12, interactive=False,
                                       elem_id="loraloop_resize_report")
        resize_refresh.click(fn=lambda: gr.update(choices=actions.lora_files()), inputs=[], outputs=[resize_source])
        resize_button.click(fn=actions.resize_lora, outputs=[resize_report],
                            inputs=[resize_source, resize_target, resize_value, resize_name, resize_overwrite])

        names = [f.name for f in fields]
        inputs = [components[n] for n in names]
        handlers = actions.TabActions(names)
        data_inputs = inputs

        model_refresh.click(fn=actions.model_info, inputs=[], outputs=[model_md])
        check_button.click(fn=handlers.check_dataset, inputs=data_inputs, outputs=[report])
        caption_inputs = [*data_inputs, prefix, suffix, find, replace, regex, add_trigger]
        preview_caps.click(fn=handlers.preview_captions, inputs=caption_inputs, outputs=[caption_out])
        write_caps.click(fn=handlers.write_captions, inputs=caption_inputs, outputs=[caption_out])
        auto_caps.click(fn=handlers.caption_with, inputs=[*caption_inputs, interrogator, overwrite_caps],
                        outputs=[proposals, caption_out])
        write_proposed.click(fn=handlers.write_proposed, inputs=[*data_inputs, proposals, overwrite_caps],
                             outputs=[caption_out])
        plan_button.click(fn=handlers.plan, inputs=inputs, outputs=[plan_out])
        export.click(fn=handlers.export_yaml, inputs=inputs, outputs=[yaml_text, exported, config_note])

        def as_updates(result_: tuple[list[Any], str]) -> list[Any]:
            values, note = result_
            return [gr.update() if v is actions.UNCHANGED else gr.update(value=v) for v in values] + [note]

        import_text.click(fn=lambda text: as_updates(handlers.import_yaml(text)), inputs=[yaml_text],
                          outputs=[*inputs, config_note])
        import_file.click(fn=lambda file: as_updates(handlers.import_file(file)), inputs=[config_file],
                          outputs=[*inputs, config_note])
        train.click(fn=handlers.train_job(), inputs=[task_id, *inputs], outputs=[loss_plot, preview, result],
                    **_js("loraloop_start_training"))
        cancel.click(fn=handlers.cancel, inputs=[], outputs=[live_text])
        live_refresh.click(fn=handlers.live, inputs=[], outputs=[live_text, live_plot])
    tab.loraloop_widgets = components  # for tests and other extensions
    return tab
