"""Mirrors modules/deepbooru.py: the module-level `model = DeepDanbooru()` whose `tag(pil_image)` is what img2img's
"Interrogate DeepBooru" calls. `tag` = `start()` (load, move to `devices.device`), `tag_multi` (tags whose score is over
`interrogate_deepbooru_score_threshold`, "rating:" tags dropped, sorted alphabetically by default, underscores as
spaces, brackets escaped, joined with ", "), `stop()` (back to the CPU unless `interrogate_keep_models_in_memory`).

Here the tags name the image's dominant colour (see interrogate.describe); `calls` (stub-only) counts tag() calls.
"""

from modules import interrogate


class DeepDanbooru:
    def __init__(self):
        self.model = None
        self.calls = 0  # stub-only
        self.running = False

    def start(self):
        self.running = True

    def stop(self):
        self.running = False

    def tag(self, pil_image):
        self.start()
        res = self.tag_multi(pil_image)
        self.stop()
        return res

    def tag_multi(self, pil_image, force_disable_ranks=False):
        self.calls += 1
        colour = interrogate.describe(pil_image).split()[1]
        return ", ".join(sorted([f"{colour} background", "no humans", "simple background"]))


model = DeepDanbooru()
