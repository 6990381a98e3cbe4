"""What a web client may send to a Gradio app's inputs: its own uploads, and values of the input's type.

A Gradio file input (gr.Image, gr.ImageEditor, gr.File, ...) receives a `FileData` dict whose
`path` the client chooses. Gradio itself only refuses paths outside its upload folder, and its
refusal quotes the path; a file inside that folder (another session's upload, a cached output,
the app's own pictures) is accepted for anyone who names it. `protect_inputs` closes that for
every event of a Blocks app at once, so a future file input cannot forget it:

- Gradio's upload route records every path it returns (`Blocks.upload_file_set`); each upload
  grants one session the right to use that path (`UploadLedger`). A path is accepted only from a
  session that claimed one of its uploads: never uploaded, uploaded by someone else, a URL, a
  `..` or symlink detour all get the same refusal, before anything is opened or copied.
- Every refusal is a `gr.Error` that names the input by its label and never quotes a path.
- Plain values are checked against their input before Gradio's preprocessing (which rounds 1.5 to
  2, passes NaN on and names inputs by position): numbers must be finite (whole for integer
  inputs), checkboxes booleans, texts strings, fixed dropdowns one of their choices.
- Image inputs are decoded once before Gradio's own preprocessing, so a non-image, a truncated
  file or one above the pixel limit gets a message naming the input instead of Gradio's
  traceback (which quotes the cached path).

Left to Gradio: its `/gradio_api/file=` route serves a file of its cache folder to whoever names
the path (it refuses everything outside, 403). Cache folders are named by the SHA-256 of the
file's content, so naming another user's upload or output needs its bytes already.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import threading
from collections import Counter, defaultdict
from pathlib import Path

import gradio as gr
from gradio_client import utils as client_utils
from PIL import Image

__all__ = ["UploadLedger", "protect_inputs", "check_image_file", "file_dicts", "without_paths"]

IMAGE_COMPONENTS = (gr.Image, gr.ImageEditor)
FILE_COMPONENTS = (gr.Image, gr.ImageEditor, gr.File, gr.Gallery, gr.Audio, gr.Video, gr.Model3D)


class UploadLedger:
    """Paths Gradio's upload route returned: unclaimed uploads per path, and the sessions that claimed one.

    The upload folder is named by the file's content hash, so two clients uploading the same
    bytes get the same path; counting uploads lets each of them claim it once.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._unclaimed: Counter[str] = Counter()
        self._owners: defaultdict[str, set[str]] = defaultdict(set)

    def record(self, paths) -> None:
        with self._lock:
            for path in paths:
                self._unclaimed[str(path)] += 1

    def claim(self, path: str, session: str | None) -> bool:
        """True if `session` may read `path`: it claimed it before, or an unclaimed upload of it is left."""
        if not session:
            return False
        with self._lock:
            if session in self._owners.get(path, ()):
                return True
            if self._unclaimed[path] <= 0:
                return False
            self._unclaimed[path] -= 1
            self._owners[path].add(session)
            return True


class _RecordingSet(set):
    """Gradio's `upload_file_set` that also tells the ledger about every upload."""

    def __init__(self, items, on_add):
        super().__init__(items)
        self._on_add = on_add

    def update(self, *iterables) -> None:
        for items in iterables:
            items = list(items)
            self._on_add(items)
            super().update(items)

    def add(self, item) -> None:
        self._on_add([item])
        super().add(item)


def file_dicts(value) -> list[dict]:
    """Every dict carrying a `path` or `url` inside an input value (a FileData, with or without `meta`)."""
    if isinstance(value, dict):
        own = [value] if "path" in value or "url" in value else []
        return own + [d for v in value.values() for d in file_dicts(v)]
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in file_dicts(v)]
    return []


def without_paths(text: str) -> str:
    """`text` with every absolute file path replaced by <path> (for messages a client sees)."""
    return re.sub(r"(?<![\w.:/])(?:[A-Za-z]:)?[/\\][^\s'\",;:)\]]+", "<path>", text)


def _label(component) -> str:
    return getattr(component, "label", None) or type(component).__name__


def _refuse(label: str, why: str, title: str = "File refused") -> gr.Error:
    return gr.Error(f"{label}: {why}", title=title)


def _inside_without_links(path: str, folder: str) -> bool:
    """`path` is a regular file below `folder`, reached without `..` or any symlink below `folder`."""
    root = os.path.abspath(folder)
    if os.path.abspath(path) != path or not path.startswith(root + os.sep):
        return False
    below = os.path.relpath(path, root)
    return os.path.realpath(path) == os.path.join(os.path.realpath(root), below) and os.path.isfile(path)


def _check_owned(file: dict, label: str, session: str | None, ledger: UploadLedger, upload_dir: str) -> None:
    path = file.get("path")
    if not (isinstance(path, str) and not client_utils.is_http_url_like(path)
            and _inside_without_links(path, upload_dir) and ledger.claim(path, session)):
        raise _refuse(label, "the server only reads files uploaded in this session, and this one was not. "
                             "Upload the file (the upload button, or gradio_client.handle_file) and send it again.")


def check_image_file(path: str, label: str, max_pixels: int) -> None:
    """Decode an uploaded image fully; gr.Error naming `label` if it is not a readable image within `max_pixels`."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _refuse(label, f"the image is {width}x{height} = {width * height} pixels; the largest "
                                     f"accepted is {max_pixels} pixels. Scale it down and upload it again.")
            image.load()  # a truncated or corrupt file fails here, not inside Gradio
    except gr.Error:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _refuse(label, f"the file is not a readable image ({type(error).__name__}). "
                             "Upload a PNG, JPEG or WebP picture.") from None


def _check_suffix(file: dict, component, label: str) -> None:
    allowed = [t.lower() for t in getattr(component, "file_types", None) or [] if t.startswith(".")]
    suffix = Path(file.get("orig_name") or file["path"]).suffix.lower()
    if allowed and suffix not in allowed:
        raise _refuse(label, f"only {', '.join(allowed)} files are accepted, got {suffix or 'a file without suffix'}.")


def check_value(component, value) -> None:
    """gr.Error naming the input if a plain value is not of the input's type (None = empty is left to the app)."""
    label = _label(component)
    if value is None:
        return
    if isinstance(component, (gr.Number, gr.Slider)):
        whole = getattr(component, "precision", None) == 0
        kind = "a whole number" if whole else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or whole and not float(value).is_integer():
            raise _refuse(label, f"must be {kind}, got {_shown(value)}.", "Invalid request")
        low, high = getattr(component, "minimum", None), getattr(component, "maximum", None)
        if low is not None and value < low or high is not None and value > high:
            raise _refuse(label, f"must be from {low} to {high}, got {_shown(value)}.", "Invalid request")
    elif isinstance(component, gr.Checkbox) and not isinstance(value, bool):
        raise _refuse(label, f"must be true or false, got {_shown(value)}.", "Invalid request")
    elif isinstance(component, gr.Textbox) and not isinstance(value, str):
        raise _refuse(label, f"must be text, got {_shown(value)}.", "Invalid request")
    elif isinstance(component, gr.Dropdown) and not component.allow_custom_value and not component.multiselect:
        choices = [choice for _, choice in component.choices]
        if value not in choices:
            raise _refuse(label, f"unknown choice {_shown(value)}: choose one of {', '.join(map(str, choices))}.",
                          "Invalid request")
    elif isinstance(component, FILE_COMPONENTS) and not isinstance(value, (dict, list)):
        raise _refuse(label, "expected an uploaded file (a FileData dict), got a plain value.")


def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_files(block_fn, inputs, session: str | None, ledger: UploadLedger, max_pixels: int) -> None:
    """Refuse (gr.Error) every file of an event's inputs that `session` did not upload, or that is not what its input takes."""
    upload_dir = gr.utils.get_upload_folder()
    for component, value in zip(block_fn.inputs, inputs):
        label = _label(component)
        for file in file_dicts(value):
            _check_owned(file, label, session, ledger, upload_dir)
            _check_suffix(file, component, label)
            if isinstance(component, IMAGE_COMPONENTS):
                check_image_file(file["path"], label, max_pixels)


def protect_inputs(blocks: gr.Blocks, max_pixels: int) -> UploadLedger:
    """Install the upload rule and the value checks on every event of `blocks` (after building the UI, before launch)."""
    ledger = UploadLedger()
    recording = _RecordingSet(blocks.upload_file_set, ledger.record)
    blocks.temp_file_sets = [recording if s is blocks.upload_file_set else s for s in blocks.temp_file_sets]
    blocks.upload_file_set = recording
    process_api = blocks.process_api
    signature = inspect.signature(process_api)

    async def guarded_process_api(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        if not a["explicit_call"] and a["iterator"] is None:  # calls from the network, not from Python
            block_fn = blocks.fns[a["block_fn"]] if isinstance(a["block_fn"], int) else a["block_fn"]
            if not block_fn.batch:
                for component, value in zip(block_fn.inputs, a["inputs"]):
                    if not getattr(component, "stateful", False):
                        check_value(component, value)
            check_files(block_fn, a["inputs"], a["session_hash"], ledger, max_pixels)  # batched: lists per input
        return await process_api(*args, **kwargs)

    blocks.process_api = guarded_process_api
    return ledger
