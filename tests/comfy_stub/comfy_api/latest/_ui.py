"""Stand-in for comfy_api/latest/_ui.py: PreviewText and PreviewImage (images are only counted, not saved)."""


class PreviewText:
    def __init__(self, value, **kwargs):
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}


class PreviewImage:
    def __init__(self, image, animated=False, cls=None, **kwargs):
        self.values = [{"filename": f"preview_{i}.png", "subfolder": "", "type": "temp"} for i in range(len(image))]
        self.animated = animated

    def as_dict(self):
        return {"images": self.values, "animated": (self.animated,)}
