// LoRA Loop tab (AUTOMATIC1111 / Forge). Loaded by the webui as a classic script: every global is prefixed loraloop_.

// Train button hook (like start_training_textual_inversion): give the job a task id so the webui's progress bar
// (requestProgress → /internal/progress) follows it, show the live preview in our gallery, and poll the loss curve.
function loraloop_start_training() {
    var id = randomId();
    var app = gradioApp();
    var bar = app.getElementById('loraloop_progressbar');
    var gallery = app.getElementById('loraloop_gallery_inner');
    loraloop_last_refresh = 0;
    requestProgress(id, bar, gallery, function() {
        loraloop_refresh_live(true);
    }, function(progress) {
        var status = app.querySelector('#loraloop_status textarea');
        if (status && progress.textinfo) {
            status.value = progress.textinfo;
        }
        loraloop_refresh_live(false);
    });
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

var loraloop_last_refresh = 0;

// Click the hidden refresh button at most every 2 s: it returns the loss curve of the running job.
function loraloop_refresh_live(force) {
    var now = Date.now();
    if (!force && now - loraloop_last_refresh < 2000) {
        return;
    }
    loraloop_last_refresh = now;
    var button = gradioApp().getElementById('loraloop_refresh_live');
    if (button) {
        button.click();
    }
}

// Hover help: the tab embeds {config key: help text} (from TrainConfig's field metadata); the webui's hints.js shows
// titles[label] as the tooltip of a label, so merge ours in.
function loraloop_add_hints() {
    var holder = gradioApp().getElementById('loraloop_hints');
    if (!holder || typeof titles === 'undefined') {
        return;
    }
    try {
        var hints = JSON.parse(holder.textContent);
        for (var key in hints) {
            if (!(key in titles)) {
                titles[key] = hints[key];
            }
        }
    } catch (e) {
        console.error('LoRA Loop: cannot read the field hints', e);
    }
}

onUiLoaded(loraloop_add_hints);
