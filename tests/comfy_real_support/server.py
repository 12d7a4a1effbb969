"""Start a real ComfyUI headless on loopback in a throw-away base directory, queue prompts, read history and memory.

The layout mirrors a normal install, inside one temporary folder (`--base-directory`):
`custom_nodes/loraloop` (a symlink to this repository, removed with the folder), `models/{checkpoints,loras}`,
`input/`, `output/`, `user/`, `temp/`, plus an `extra_model_paths.yaml` that registers the same models folder first
(`is_default`), so a user's own `extra_model_paths.yaml` in the checkout cannot send saved LoRAs elsewhere.
Nothing is written into the ComfyUI checkout.

Only the standard library is used, so the bench can import this from any Python.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "loraloop"


class ComfyError(RuntimeError):
    """A prompt was refused or failed; the message carries ComfyUI's own error text."""


def comfy_python(comfy_dir: Path) -> Path:
    """COMFYUI_PYTHON, else the checkout's own venv (`.venv`, then `venv`)."""
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return Path(explicit)
    for name in (".venv", "venv"):
        candidate = comfy_dir / name / "bin" / "python"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no Python for ComfyUI: set COMFYUI_PYTHON or create {comfy_dir / '.venv'}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_layout(base: Path, checkpoint: Path | None = None, pack: Path = REPO) -> Path:
    """The folders under `base`, the pack symlinked into custom_nodes, the checkpoint symlinked into checkpoints."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(pack, target_is_directory=True)
    if checkpoint is not None:
        target = base / "models" / "checkpoints" / checkpoint.name
        if not target.exists():
            target.symlink_to(checkpoint)
    (base / "extra_model_paths.yaml").write_text(
        "loraloop_test:\n"
        f"  base_path: {base / 'models'}\n"
        "  is_default: true\n"
        "  checkpoints: checkpoints\n"
        "  loras: loras\n", encoding="utf-8")
    return base


@dataclass
class ComfyServer:
    """One ComfyUI process. Use as a context manager; `stop()` is idempotent."""

    comfy_dir: Path
    base: Path
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    python: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def command(self) -> list[str]:
        b = self.base
        return [str(self.python or comfy_python(self.comfy_dir)), "main.py", "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(b),
                "--input-directory", str(b / "input"), "--output-directory", str(b / "output"),
                "--user-directory", str(b / "user"), "--temp-directory", str(b / "temp"),
                "--extra-model-paths-config", str(b / "extra_model_paths.yaml"),
                "--database-url", f"sqlite:///{b / 'user' / 'comfyui.db'}", *self.extra_args]

    def start(self, timeout: float = 300.0) -> ComfyServer:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)  # the pack must import the way ComfyUI imports it, not from the test's path
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 60) -> object:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, path: str, data: dict, timeout: float = 60) -> object:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read().decode()
        except urllib.error.HTTPError as err:
            raise ComfyError(f"POST {path} refused ({err.code}): {err.read().decode()}") from None
        return json.loads(body) if body else None

    def queue(self, prompt: dict, client_id: str = "loraloop-test") -> str:
        answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        if answer.get("node_errors"):
            raise ComfyError(f"prompt refused: {json.dumps(answer['node_errors'])[:4000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1800.0, poll: float = 0.5, *,
             interrupted_ok: bool = False) -> dict:
        """The /history entry once the prompt is done; raises ComfyError with the node's exception if it failed.

        `interrupted_ok`: a prompt stopped by /interrupt (ComfyUI records it as status "error" with an
        `execution_interrupted` message and no `execution_error`) is returned instead of raised."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died (exit {self.proc.returncode}):\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                if interrupted_ok and interrupted(entry):
                    return entry
                if entry["status"].get("status_str") == "error":
                    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    raise ComfyError(f"prompt failed: {json.dumps(errors)[:6000]}\n{self.log_tail()}")
                return entry
            time.sleep(poll)
        raise ComfyError(f"prompt {prompt_id} not done after {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 1800.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    # -- logs and memory -------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def _status(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads), from /proc/PID/stat."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> int:
        """Resident set size of the server process now, in bytes (Linux)."""
        return self._status()["VmRSS"]

    def peak_rss(self) -> int:
        """The kernel's high-water mark of the resident set (VmHWM) since start or the last `reset_peak_rss`."""
        return self._status()["VmHWM"]

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`, Linux ≥ 4.0, own process)."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


def execution_seconds(entry: dict) -> float:
    """Time from execution_start to execution_success of a /history entry (server-side timestamps, ms)."""
    stamps = {m[0]: m[1].get("timestamp") for m in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def message_kinds(entry: dict) -> list[str]:
    """The kinds of a /history entry's status messages in order (execution_start, execution_cached, …)."""
    return [kind for kind, _ in entry.get("status", {}).get("messages", [])]


def interrupted(entry: dict) -> bool:
    """The prompt ended by /interrupt (Cancel in the UI), not by a node's error."""
    kinds = message_kinds(entry)
    return "execution_interrupted" in kinds and "execution_error" not in kinds


def cached_nodes(entry: dict) -> set[str]:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            return set(data.get("nodes", []))
    return set()


class RssSampler:
    """Samples a process's RSS every `interval` s in a thread; `.peak` is the largest value seen (bytes)."""

    def __init__(self, server: ComfyServer, interval: float = 0.05) -> None:
        self.server, self.interval, self.peak, self.samples = server, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.server.rss())
                self.samples += 1
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def copy_dataset(source: Path, target: Path, size: int) -> Path:
    """Copy an image folder (captions and metadata too), resizing every image to `size`×`size` RGB PNG."""
    from PIL import Image

    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            with Image.open(path) as im:
                im.convert("RGB").resize((size, size), Image.BICUBIC).save(target / (path.stem + ".png"))
        elif path.is_file():
            shutil.copy2(path, target / path.name)
    return target


class EventListener:
    """ComfyUI's websocket (`/ws?clientId=…`) read in a thread with the standard library only; every JSON message is
    kept as (perf_counter() on arrival, server CPU seconds then, type, data). Binary frames (previews) are skipped.
    Queue prompts with the same client_id to receive their `progress`/`executing` events."""

    def __init__(self, server: ComfyServer, client_id: str = "loraloop-bench") -> None:
        import base64

        self.server, self.client_id, self.events = server, client_id, []
        self._sock = socket.create_connection(("127.0.0.1", server.port), timeout=None)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(1)
            if not chunk:
                raise ComfyError("websocket handshake failed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ComfyError(f"websocket handshake refused: {head[:200]!r}")
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def _send(self, opcode: int, payload: bytes) -> None:  # client frames must be masked
        import struct

        mask = os.urandom(4)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | len(payload)]) if len(payload) < 126
                                           else bytes([0x80 | 126]) + struct.pack(">H", len(payload)))
        self._sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _loop(self) -> None:
        import struct

        message, kind = b"", 0
        try:
            while True:
                b1, b2 = self._recv(2)
                opcode, length = b1 & 0x0F, b2 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._recv(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._recv(8))[0]
                mask = self._recv(4) if b2 & 0x80 else None
                payload = self._recv(length)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 8:
                    return
                if opcode == 9:
                    self._send(10, payload)
                    continue
                if opcode in (1, 2):
                    message, kind = payload, opcode
                elif opcode == 0:
                    message += payload
                if b1 & 0x80 and kind == 1:
                    data = json.loads(message.decode())
                    now, cpu = time.perf_counter(), self.server.cpu_seconds()
                    with self._lock:
                        self.events.append((now, cpu, data.get("type"), data.get("data")))
        except (OSError, ConnectionError, ValueError):
            return

    def progress_times(self, prompt_id: str, node: str) -> list[tuple[float, float, int]]:
        """(arrival time, server CPU seconds, value) of every `progress` event of `node` in `prompt_id`."""
        with self._lock:
            return [(t, cpu, d["value"]) for t, cpu, kind, d in self.events
                    if kind == "progress" and d.get("prompt_id") == prompt_id and d.get("node") == node]

    def loss_steps(self, node: str) -> list[int]:
        """The completed training steps that TrainLoRA `node` reported so far (its `loraloop.loss` events)."""
        with self._lock:
            return [d["step"] for _, _, kind, d in self.events
                    if kind == "loraloop.loss" and isinstance(d, dict) and d.get("node") == node and "step" in d]

    def close(self) -> None:
        try:
            self._send(8, b"")
            self._sock.close()
        except OSError:
            pass
        self._thread.join(timeout=5)


def comfy_dir_or_skip(request, marker_file: str = "main.py", why: str = "starts a real ComfyUI") -> Path:
    """COMFYUI_DIR for an opt-in test: skipped unless it is set and `-m comfyui` selects the test; a folder that is
    not a ComfyUI checkout (no `marker_file`) fails."""
    import pytest

    raw = os.environ.get("COMFYUI_DIR")
    if not raw:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout (and run with -m comfyui)")
    if "comfyui" not in (request.config.getoption("markexpr") or ""):
        pytest.skip(f"{why}: run with -m comfyui")
    path = Path(raw).expanduser().resolve()
    if not (path / marker_file).is_file():
        pytest.fail(f"COMFYUI_DIR={raw} is not a ComfyUI checkout (no {marker_file})")
    return path


def timed(timings: dict, name: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, its wall time recorded as `timings[name]` (seconds, even when it raises)."""
    started = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[name] = round(time.perf_counter() - started, 1)


def prompt_outputs(server, entry: dict, node: str) -> list[Path]:
    """Files a prompt's `node` saved (images or latents), under the server's output folder."""
    items = entry["outputs"][node].get("images", []) + entry["outputs"][node].get("latents", [])
    return [server.base / "output" / i.get("subfolder", "") / i["filename"] for i in items]


def saved_latent(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


def saved_pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


class RunOnce:
    """Prompts a module runs once each, in order; a failure is remembered, so later tests fail at once instead of
    training again."""

    def __init__(self) -> None:
        self.results: dict[str, object] = {}

    def _once(self, name: str, fn):
        if name not in self.results:
            try:
                self.results[name] = fn()
            except Exception as err:
                self.results[name] = err
        if isinstance(self.results[name], Exception):
            raise self.results[name]  # type: ignore[misc]
        return self.results[name]
