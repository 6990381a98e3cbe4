"""LoRAs and embeddings for a long-running server (the web UI): names from start-up folders, applied per request.

`ServedAdapters.load(pipe, lora_dir, embedding_dir, allow_pickle)` offers the files of those folders by
name (the file stem; `.safetensors` only unless `allow_pickle`):

* embeddings are loaded once, at start-up; the token is the file name, as in A1111, so a request
  uses one by writing its name in the prompt (recipes record the ones a prompt uses);
* LoRAs are named in the prompt with A1111's `<lora:NAME:W>`, resolved in `lora_dir` only
  (`adapters.prompt_loras`: a name, never a path; the tag is removed from the text encoded).

Requests run on their own copies of the pipeline but share its networks
(`GenerationService.request_pipe`), and a LoRA lives inside those networks (peft layers and their
adapter weights). `using(loras)` therefore lets requests with the same LoRA set run together; a
request with another set waits, first come first served, until those finish, then switches the
set (`adapters.activate_loras`: files loaded once, then only enabled and weighted).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ldm_pipeline.adapters import (
    LoraFile,
    activate_loras,
    allowed_suffixes,
    files_by_name,
    load_embeddings,
    prompt_loras,
)
from ldm_pipeline.pipeline import GenerationCancelled

logger = logging.getLogger(__name__)

TOKEN_NAME = re.compile(r"^[\w.\-]+$")  # an embedding name that reads as one token in a prompt
WAIT_POLL = 0.2  # seconds between checks of a waiting request's stop event


class _LoraGate:
    """The LoRA set active in shared networks, switched only while no request uses them (FIFO)."""

    def __init__(self, pipe, allow_pickle: bool):
        self.pipe, self.allow_pickle = pipe, allow_pickle
        self.condition = threading.Condition()
        self.waiting: collections.deque = collections.deque()
        self.active: tuple | None = ()  # the set's key; () = no LoRA; None = unknown (a switch failed)
        self.records: list[dict] = []
        self.users = 0

    @staticmethod
    def key(loras: list[LoraFile]) -> tuple:
        """Files (with their size and time, so a replaced file loads again) and weights."""
        return tuple((str(f.path), f.path.stat().st_size, f.path.stat().st_mtime_ns, f.scale) for f in loras)

    @contextlib.contextmanager
    def using(self, loras: list[LoraFile], stop: threading.Event | None) -> Iterator[list[dict]]:
        key, ticket = self.key(loras), object()
        with self.condition:
            self.waiting.append(ticket)
            try:
                self._wait_for_turn(ticket, key, stop)
                if self.active != key:
                    self.active = None
                    self.records = activate_loras(self.pipe, loras, self.allow_pickle)
                    self.active = key
                self.users += 1
                records = self.records
            finally:
                if ticket in self.waiting:
                    self.waiting.remove(ticket)
                self.condition.notify_all()
        try:
            yield records
        finally:
            with self.condition:
                self.users -= 1
                self.condition.notify_all()

    def _wait_for_turn(self, ticket, key: tuple, stop: threading.Event | None) -> None:
        """Until `ticket` is first in line and the networks are free or already hold `key`."""
        def ready() -> bool:
            return self.waiting[0] is ticket and (self.users == 0 or self.active == key)

        while not self.condition.wait_for(ready, timeout=WAIT_POLL):
            if stop is not None and stop.is_set():
                raise GenerationCancelled("cancelled while waiting for another LoRA set to finish")


@dataclass
class ServedAdapters:
    """The LoRA and embedding folders a server offers by name (see the module docstring)."""

    pipe: object
    lora_dir: Path | None = None
    embedding_dir: Path | None = None
    allow_pickle: bool = False
    embeddings: list[dict] = field(default_factory=list)  # records of the loaded embeddings
    gate: _LoraGate | None = None  # made in __post_init__

    def __post_init__(self):
        self.gate = self.gate or _LoraGate(self.pipe, self.allow_pickle)

    @classmethod
    def load(cls, pipe, lora_dir: Path | None = None, embedding_dir: Path | None = None,
             allow_pickle: bool = False) -> "ServedAdapters":
        """Check the folders and load every embedding of `embedding_dir`; FileNotFoundError names a bad folder."""
        for flag, folder in (("--lora-dir", lora_dir), ("--embedding-dir", embedding_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise FileNotFoundError(f"{flag} {folder}: no such folder.")
        served = cls(pipe, lora_dir and Path(lora_dir), embedding_dir and Path(embedding_dir), allow_pickle)
        if embedding_dir is not None:
            served.embeddings = load_embeddings(pipe, list(served.embedding_files().values()), allow_pickle)
        return served

    @property
    def suffixes(self) -> tuple[str, ...]:
        return allowed_suffixes(self.allow_pickle)

    def lora_names(self) -> list[str]:
        return list(files_by_name(self.lora_dir, self.suffixes)) if self.lora_dir else []

    def embedding_names(self) -> list[str]:
        return [record["name"] for record in self.embeddings]

    def embedding_files(self) -> dict[str, Path]:
        """The embeddings of the folder whose names can be written in a prompt (others are skipped, logged)."""
        files = files_by_name(self.embedding_dir, self.suffixes)
        for name in [n for n in files if not TOKEN_NAME.match(n)]:
            logger.warning("--embedding-dir: skipped %s: its name, the token prompts use, must be letters, digits, "
                           "'_', '-' or '.'; rename the file", files.pop(name).name)
        return files

    def split_prompt(self, prompt) -> tuple[object, list[LoraFile]]:
        """The prompt without its `<lora:NAME:W>` tags and the LoRAs they name (ValueError for a bad tag)."""
        if not isinstance(prompt, str):
            texts = prompt if isinstance(prompt, (list, tuple)) else []  # not text at all: the options check says so
            if any(isinstance(p, str) and "<lora:" in p for p in texts):
                raise ValueError("<lora:NAME:W> tags need a single prompt, not a list: one request per LoRA set.")
            return prompt, []
        return prompt_loras(prompt, self.lora_dir, self.suffixes)

    def used_embeddings(self, texts: list[str]) -> list[dict]:
        """The records of the embeddings whose token appears in `texts` (the ones that change the image)."""
        return [record for record in self.embeddings if any(record["name"] in text for text in texts)]

    def using(self, loras: list[LoraFile], stop: threading.Event | None = None):
        """Context manager: `loras` active in the shared networks while the block runs; yields their records.
        Raises GenerationCancelled if `stop` is set while it waits for its turn."""
        return self.gate.using(loras, stop)
