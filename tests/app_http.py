"""Raw HTTP to a running Gradio app, the way an attacker's script talks to it (no gradio_client uploads).

gradio_client uploads every local path it is given before calling, so a path naming a server file
never reaches the server as such from it; these helpers send exactly the JSON a client chooses.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx

API = "gradio_api"


def file_data(path: str, meta: bool = True) -> dict:
    """A FileData dict as a client may send it; `meta=False` drops the type marker Gradio looks for."""
    return {"path": path, "meta": {"_type": "gradio.FileData"}} if meta else {"path": path}


def fn_index(url: str, api_name: str) -> int:
    config = httpx.get(f"{url}config", timeout=30).json()
    for dependency in config["dependencies"]:
        if dependency.get("api_name") == api_name:
            return dependency["id"]
    raise KeyError(f"no endpoint /{api_name}")


def endpoints_taking_files(url: str) -> set[str]:
    """api names of every event with an input that holds files (image, editor, file, gallery, audio, video)."""
    config = httpx.get(f"{url}config", timeout=30).json()
    kinds = {c["id"]: c["type"] for c in config["components"]}
    file_kinds = {"image", "imageeditor", "file", "gallery", "audio", "video", "model3d", "uploadbutton"}
    return {d["api_name"] for d in config["dependencies"]
            if d.get("api_name") and any(kinds.get(i) in file_kinds for i in d["inputs"])}


def upload(url: str, path: Path) -> str:
    """POST a file to Gradio's upload route; the server path it returns."""
    with open(path, "rb") as f:
        response = httpx.post(f"{url}{API}/upload", files=[("files", (path.name, f))], timeout=60)
    response.raise_for_status()
    return response.json()[0]


def call(url: str, api_name: str, data: list, session: str | None = None, timeout: float = 120,
         event_data: dict | None = None) -> tuple[dict, str]:
    """Run one event through the queue as the browser does; (the completed message, the raw stream text).
    `event_data`: what the browser sends with a select event ({"index": i, "value": ...})."""
    session = session or secrets.token_hex(6)
    body = {"data": data, "fn_index": fn_index(url, api_name), "session_hash": session, "event_data": event_data,
            "trigger_id": None}
    joined = httpx.post(f"{url}{API}/queue/join", content=json.dumps(body),  # NaN / Infinity allowed
                        headers={"Content-Type": "application/json"}, timeout=30)
    joined.raise_for_status()
    raw = []
    with httpx.stream("GET", f"{url}{API}/queue/data", params={"session_hash": session}, timeout=timeout) as stream:
        for line in stream.iter_lines():
            raw.append(line)
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message, "\n".join(raw)
    raise AssertionError("the stream ended without process_completed:\n" + "\n".join(raw))


def error_of(message: dict) -> str | None:
    """The error text of a completed event, None if it succeeded."""
    if message.get("success"):
        return None
    return (message.get("output") or {}).get("error") or "(no message)"
