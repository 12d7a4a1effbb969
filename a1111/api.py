"""HTTP API of the extension (registered when the webui serves its API: --api or --nowebui), for scripts and tests.

  POST /loraloop/v1/train          {"config": {<config keys>}, "preferred_weight": 0.8, "make_preview": true}
                                   → the run's result (files, steps, losses, the <lora:…> tag); runs in the webui's
                                   queue like /sdapi/v1/txt2img, so it never overlaps a generation
  POST /loraloop/v1/check-dataset  {"config": {...}} → {"report": text, "will_fail": bool}
  GET  /loraloop/v1/status         → the running job: step, total, losses, text
Values follow the tab's conventions: "auto" / 0 resolution follow the loaded model; 0 or "" leave optional values
unset. With --api-auth, the routes ask for the same HTTP basic credentials as the webui's own API.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations and resolves string annotations
in the module's globals, where the FastAPI classes (imported inside `register`, so that importing this module needs no
FastAPI) are not; every annotation FastAPI sees must be a real object.
"""

import logging
import secrets
from typing import Any, Optional

from ..trainer.errors import LoraLoopError
from . import training, webui
from .sink import LIVE

log = logging.getLogger(__name__)

PREFIX = "/loraloop/v1"


def api_enabled() -> bool:
    opts = webui.cmd_opts()
    return bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


def credentials_ok(api_auth: str | None, username: str | None, password: str | None) -> bool:
    """The webui's --api-auth rule: "user:pass,user2:pass2"; no setting means no check."""
    if not api_auth:
        return True
    pairs = dict(item.split(":", 1) for item in api_auth.split(",") if ":" in item)
    expected = pairs.get(username or "")
    return expected is not None and secrets.compare_digest(expected.encode(), (password or "").encode())


def payload_values(payload: dict[str, Any]) -> dict[str, Any]:
    """Tab-style values from a request body: {"config": {...}, extras} or a flat mapping."""
    if not isinstance(payload, dict):
        raise TypeError("the request body must be a JSON object")
    config = payload.get("config")
    values = dict(config) if isinstance(config, dict) else {k: v for k, v in payload.items() if k != "config"}
    for extra in ("preferred_weight", "make_preview"):
        if extra in payload and isinstance(config, dict):
            values[extra] = payload[extra]
    return values


def train(payload: dict[str, Any]) -> dict[str, Any]:
    values = payload_values(payload)
    with webui.queued_job():
        return training.run_training(values).as_json()


def check_dataset(payload: dict[str, Any]) -> dict[str, Any]:
    text, will_fail = training.check_dataset_text(payload_values(payload))
    return {"report": text, "will_fail": will_fail}


def status() -> dict[str, Any]:
    return LIVE.snapshot()


def register(app: Any) -> bool:
    """Add the routes to the webui's FastAPI app (script_callbacks.on_app_started)."""
    if app is None or not api_enabled():
        return False
    from fastapi import Body, Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    api_auth = getattr(webui.cmd_opts(), "api_auth", None)
    basic = HTTPBasic(auto_error=False)

    def auth(credentials: Optional[HTTPBasicCredentials] = Depends(basic)) -> None:  # noqa: B008, UP045 - FastAPI idiom
        user, password = (credentials.username, credentials.password) if credentials else (None, None)
        if not credentials_ok(api_auth, user, password):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    def guarded(fn):  # noqa: ANN001, ANN202
        def endpoint(payload: dict = Body(...), _: None = Depends(auth)) -> dict:  # noqa: B008
            try:
                return fn(payload)
            except LoraLoopError as err:
                raise HTTPException(status_code=422, detail={"error": str(err), "type": type(err).__name__,
                                                             "key": getattr(err, "key", None)}) from err
        return endpoint

    app.add_api_route(f"{PREFIX}/train", guarded(train), methods=["POST"])
    app.add_api_route(f"{PREFIX}/check-dataset", guarded(check_dataset), methods=["POST"])

    def status_endpoint(_: None = Depends(auth)) -> dict:
        return status()

    app.add_api_route(f"{PREFIX}/status", status_endpoint, methods=["GET"])
    log.info("LoRA Loop: API routes under %s", PREFIX)
    return True
