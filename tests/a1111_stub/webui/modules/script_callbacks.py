"""Mirrors the registration half of modules/script_callbacks.py, plus the calls the webui makes at start-up."""

callbacks_ui_tabs = []
callbacks_app_started = []
callbacks_ui_settings = []
callbacks_model_loaded = []
callbacks_script_unloaded = []


def on_ui_tabs(callback, *, name=None):
    callbacks_ui_tabs.append(callback)


def on_app_started(callback, *, name=None):
    callbacks_app_started.append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks_ui_settings.append(callback)


def on_model_loaded(callback, *, name=None):
    callbacks_model_loaded.append(callback)


def on_script_unloaded(callback, *, name=None):
    callbacks_script_unloaded.append(callback)


def ui_tabs_callback():
    res = []
    for c in callbacks_ui_tabs:
        res += c() or []
    return res


def app_started_callback(demo, app):
    for c in callbacks_app_started:
        c(demo, app)
