"""A much smaller `Options` than modules/options.py: attribute access to settings, with the webui's defaults."""


class Options:
    def __init__(self, data):
        object.__setattr__(self, "data", dict(data))

    def __getattr__(self, item):
        try:
            return self.data[item]
        except KeyError:
            raise AttributeError(item) from None

    def __setattr__(self, key, value):
        self.data[key] = value
