"""Stand-in for ComfyUI 0.12.3's server.py: PromptServer.instance with send_sync/send_progress_text, recorded."""


class PromptServer:
    instance = None

    def __init__(self):
        PromptServer.instance = self
        self.client_id = "test-client"
        self.messages = []  # (event, data, sid)

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"text": text, "node": node_id}, sid))
