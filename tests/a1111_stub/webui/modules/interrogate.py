"""Mirrors modules/interrogate.py `InterrogateModels.interrogate(pil_image)`: what img2img's "Interrogate CLIP" calls
(through `shared.interrogator`, created in shared_init.py as `InterrogateModels("interrogate")`).

The webui's method runs the whole call as a job (`shared.state.begin(job="interrogate")` … `state.end()`), loads BLIP
and CLIP onto `devices.device_interrogate`, returns the BLIP sentence followed by ", <term>" for each CLIP category
(artists, flavors, mediums, movements), sends the models back to RAM unless `interrogate_keep_models_in_memory`,
and on any exception logs it and returns what it had with "<error>" appended instead of raising.

Here the "sentence" names the image's dominant colour, so tests can tell which image a caption belongs to.
`calls` (stub-only) records the size of every image interrogated; `fail_on` makes images of that size end in
"<error>" as the webui does on a failure.
"""

from modules import shared

COLOURS = {0: "red", 1: "green", 2: "blue"}


def describe(pil_image):
    """The stand-in's "BLIP sentence": the dominant channel of the image's mean colour."""
    from PIL import ImageStat

    means = ImageStat.Stat(pil_image.convert("RGB")).mean
    return f"a {COLOURS[max(range(3), key=means.__getitem__)]} square"


class InterrogateModels:
    blip_model = None
    clip_model = None

    def __init__(self, content_dir):
        self.content_dir = content_dir
        self.calls = []  # stub-only
        self.fail_on = None  # stub-only: an image size (w, h) whose interrogation fails

    def interrogate(self, pil_image):
        res = ""
        shared.state.begin(job="interrogate")
        try:
            self.calls.append(pil_image.size)
            if pil_image.size == self.fail_on:
                raise RuntimeError("stand-in failure")
            res = describe(pil_image) + ", flat colour, minimalism"
        except Exception:
            res += "<error>"
        shared.state.end()
        return res
