"""A loaded model serving many requests: the web UI's engine (and any other long-running front end).

    service = GenerationService.load(model, outputs=Path("outputs"))
    request = ServiceRequest(GenerationOptions(prompt="a red circle", seed=5, num_images_per_prompt=2),
                             sampler="dpmpp-2m", batch_count=3)
    service.check(request)                    # InvalidOptions naming every problem
    for path, recipe in service.generate(request, on_step=..., stop=threading.Event()): ...

The model is loaded once; each request runs on its own shallow copy of the pipeline (same
weights, its own scheduler instance and tokenizer), so concurrent requests never share
sampler state. Samplers are prepared once (`prepare_schedulers`): every name checked
against the model, unusable ones kept with the reason.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from ldm_pipeline import metadata
from ldm_pipeline.loading import load_pipeline
from ldm_pipeline.options import GenerationOptions, InvalidOptions, image_seeds
from ldm_pipeline.pipeline import GenerationCancelled
from ldm_pipeline.previews import LatentPreviewer, preview_callback
from ldm_pipeline.scheduler_swap import SchedulerSwapError, available_schedulers, swap_scheduler


def prepare_schedulers(pipe, names: set[str]) -> dict:
    """name -> checked scheduler (or the error that makes the name unusable for this model)."""
    base = pipe.scheduler
    prepared = {None: base}
    for name in sorted(names):
        try:
            swap_scheduler(pipe, name)
            prepared[name] = pipe.scheduler
        except SchedulerSwapError as error:
            prepared[name] = error
        finally:
            pipe.scheduler = base
    return prepared


@dataclass
class ServiceRequest:
    """One request: the settings, the sampler, and how many batches of `num_images_per_prompt` to make."""

    options: GenerationOptions
    sampler: str | None = None  # None = the model's own scheduler
    batch_count: int = 1

    def seeds(self) -> list[list[int]]:
        """Seeds per batch: image j of the whole request gets seed + j (a random seed when it is None)."""
        n = self.options.num_images_per_prompt
        seeds = image_seeds(self.options.seed, n * self.batch_count)
        return [seeds[b * n : (b + 1) * n] for b in range(self.batch_count)]


@dataclass
class GenerationService:
    """The model loaded once at start-up, shared by every request (see module docstring)."""

    pipe: object
    outputs: Path
    schedulers: dict = field(default_factory=dict)  # name -> prepared scheduler, or the error for this model
    stops: dict = field(default_factory=dict)  # session -> set of threading.Events of its running requests
    preview_map: LatentPreviewer | None = None  # fitted on first use, see previewer()
    preview_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, model, outputs: Path, **load_options) -> "GenerationService":
        pipe = load_pipeline(model, **load_options)
        return cls(pipe, outputs, prepare_schedulers(pipe, set(available_schedulers())))

    @property
    def sampler_names(self) -> list[str]:
        """Usable samplers: the registry's short names first, then diffusers' stock classes."""
        usable = [name for name, s in self.schedulers.items() if name and not isinstance(s, Exception)]
        return sorted(usable, key=lambda name: (name[:1].isupper(), name))

    def check(self, request: ServiceRequest) -> GenerationOptions:
        """The request's options with the model's defaults, checked; InvalidOptions lists every problem."""
        options = request.options.with_defaults(getattr(self.pipe, "recommended", {}))
        problems = options.problems(self.pipe.limits())
        if request.sampler is not None and request.sampler not in self.sampler_names:
            problems.append(f"Unknown sampler {request.sampler!r}: choose one of {', '.join(self.sampler_names)}.")
        if problems:
            raise InvalidOptions(" ".join(problems))
        return options

    def request_pipe(self, sampler: str | None):
        """A pipeline sharing the loaded networks, with a fresh scheduler of the chosen kind."""
        prepared = self.schedulers.get(sampler, self.pipe.scheduler)
        base = self.pipe
        parts = {name: copy.deepcopy(part) if name.startswith("tokenizer") else part  # fast tokenizers are not
                 for name, part in base.components.items()}  # thread-safe; SDXL has two
        settings = {k: v for k, v in base.config.items() if not k.startswith("_") and k not in parts}
        pipe = type(base)(**{**parts, "scheduler": type(prepared).from_config(prepared.config)}, **settings)
        pipe.model_id, pipe.model_hash, pipe.recommended = base.model_id, base.model_hash, base.recommended
        return pipe

    def previewer(self) -> LatentPreviewer:
        """The latent -> RGB preview map, fitted to this model's VAE on first use (a few decodes)."""
        with self.preview_lock:
            if self.preview_map is None:
                self.preview_map = LatentPreviewer.fit(self.pipe.vae, self.pipe._device)
            return self.preview_map

    def generate(self, request: ServiceRequest, on_step=None, stop: threading.Event | None = None,
                 on_preview=None, preview_every: int | None = None) -> list:
        """Make every image of a request; returns (written PNG, recipe) pairs.

        `on_step(done, total)` reports progress; setting `stop` ends the run after the current step
        (the images of the batches already finished are kept). With `preview_every` = N, every N steps
        `on_preview(step, total, images)` gets cheap previews of the batch's current latents (`previews`).
        """
        options = self.check(request)
        pipe = self.request_pipe(request.sampler)
        self.outputs.mkdir(parents=True, exist_ok=True)
        batches = request.seeds()
        results, done = [], 0

        def callback(info) -> bool:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, info.num_steps * len(batches))
            return stop is not None and stop.is_set()

        if preview_every:
            callback = preview_callback(self.previewer(), preview_every, on_preview, callback,
                                        scale=pipe.vae_scale_factor)
        for seeds in batches:
            try:
                out = pipe(**replace(options, seed=seeds, callback=callback, progress_bar=False).kwargs())
            except GenerationCancelled:
                break
            results += [(self.write(image, recipe), recipe) for image, recipe in zip(out.images, out.recipes)]
        return results

    def write(self, image, recipe: dict) -> Path:
        """The PNG with the same embedded parameters as `ldm-generate` writes (atomic)."""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-seed{recipe['seed']}.png"
        return metadata.write_png(self.outputs / name, image, recipe)

    # ------------------------------------------------------------ cancelling, per browser session

    def register_stop(self, session: str) -> threading.Event:
        stop = threading.Event()
        self.stops.setdefault(session, set()).add(stop)
        return stop

    def release_stop(self, session: str, stop: threading.Event) -> None:
        self.stops.get(session, set()).discard(stop)

    def stop_session(self, session: str) -> None:
        """Every running request of this session stops after its current step."""
        for event in list(self.stops.get(session, ())):
            event.set()
