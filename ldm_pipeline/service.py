"""A loaded model serving many requests: the web UI's engine (and any other long-running front end).

    service = GenerationService.load(model, outputs=Path("outputs"))
    request = ServiceRequest(GenerationOptions(prompt="a red circle", seed=5, num_images_per_prompt=2),
                             sampler="dpmpp-2m", batch_count=3)
    service.check(request)                    # InvalidOptions naming every problem
    for path, recipe in service.generate(request, on_step=..., stop=threading.Event()): ...

The model is loaded once; each request runs on its own shallow copy of the pipeline (same
weights, its own scheduler instance and tokenizer), so concurrent requests never share
sampler state. Samplers are prepared once (`prepare_schedulers`): every name checked
against the model, unusable ones kept with the reason; a sampler with an A1111 schedule type
("Karras", ...) is prepared on first use. LoRAs (`<lora:NAME:W>` in the prompt) and embeddings
come from the start-up folders only (`served_adapters`), and a LoRA set is only switched while no
other request runs on the shared networks.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from custom_schedulers import names, registry
from ldm_pipeline import hires, metadata
from ldm_pipeline.guidance_methods import sampler_problem
from ldm_pipeline.loading import load_pipeline
from ldm_pipeline.options import GenerationOptions, InvalidOptions, image_seeds
from ldm_pipeline.pipeline import GenerationCancelled
from ldm_pipeline.previews import PREVIEW_MODES, LatentPreviewer, VaePreviewer, preview_callback
from ldm_pipeline.scheduler_swap import SchedulerSwapError, available_schedulers, swap_scheduler
from ldm_pipeline.served_adapters import ServedAdapters


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


def scheduler_with_schedule(base, name: str | None, schedule_type: str):
    """Sampler `name` (None = `base`'s class) with an A1111 schedule type ("Karras", ...), checked against the
    model as `swap_scheduler` checks every swap; SchedulerSwapError or ValueError say why it cannot be."""
    name = name or type(base).__name__
    overrides = names.schedule_overrides(schedule_type, stock=not registry.is_ours(name))
    scratch = SimpleNamespace(scheduler=base)  # swap_scheduler only uses .scheduler
    swap_scheduler(scratch, name, **overrides)
    return scratch.scheduler


def pipe_copy(base, scheduler):
    """A pipeline sharing `base`'s networks, with `scheduler` and its own tokenizers (fast tokenizers are not
    thread-safe): every component and the config for SDXL (refiners too), the SD 1.x parts otherwise."""
    if base.family == "sdxl":
        parts = {name: copy.deepcopy(part) if name.startswith("tokenizer") else part
                 for name, part in base.components.items()}
        settings = {k: v for k, v in base.config.items() if not k.startswith("_") and k not in parts}
        pipe = type(base)(**{**parts, "scheduler": scheduler}, **settings)
    else:
        pipe = type(base)(vae=base.vae, text_encoder=base.text_encoder, unet=base.unet,
                          tokenizer=copy.deepcopy(base.tokenizer), scheduler=scheduler)
    pipe.model_id, pipe.model_hash = base.model_id, base.model_hash
    pipe.recommended = getattr(base, "recommended", {})
    return pipe


def load_sdxl_refiner(folder, base, load_options: dict):
    from ldm_pipeline.sdxl import Refiner  # diffusers' SDXL parts: only when a refiner is asked for

    return Refiner.load(folder, base, **load_options)


@dataclass
class ServiceRequest:
    """One request: the settings, the sampler, and how many batches of `num_images_per_prompt` to make."""

    options: GenerationOptions
    sampler: str | None = None  # None = the model's own scheduler
    batch_count: int = 1
    schedule_type: str | None = None  # an A1111 schedule type ("Karras", ...); None or "Automatic" = the sampler's
    refiner_switch_at: float | None = None  # the service's SDXL refiner takes over at this fraction; None = not used

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
    adapters: ServedAdapters | None = None  # LoRA / embedding folders; None = none (set in __post_init__)
    scheduled: dict = field(default_factory=dict)  # (sampler, schedule type) -> scheduler or error, on first use
    scheduled_lock: threading.Lock = field(default_factory=threading.Lock)
    refiner: object | None = None  # an `sdxl.Refiner` (`load(refiner=FOLDER)`), on a copy per request

    def __post_init__(self):
        self.adapters = self.adapters or ServedAdapters(self.pipe)  # no folders: no LoRA, no embedding

    @classmethod
    def load(cls, model, outputs: Path, lora_dir: Path | None = None, embedding_dir: Path | None = None,
             refiner=None, **load_options) -> "GenerationService":
        """The model (`load_pipeline(model, **load_options)`), its samplers, the LoRA / embedding folders and an
        SDXL refiner folder (for an SDXL model; ValueError names a mismatch)."""
        pipe = load_pipeline(model, **load_options)
        adapters = ServedAdapters.load(pipe, lora_dir, embedding_dir, load_options.get("allow_pickle", False))
        return cls(pipe, outputs, prepare_schedulers(pipe, set(available_schedulers())), adapters=adapters,
                   refiner=None if refiner is None else load_sdxl_refiner(refiner, pipe, load_options))

    @property
    def sampler_names(self) -> list[str]:
        """Usable samplers: the registry's short names first, then diffusers' stock classes."""
        usable = [name for name, s in self.schedulers.items() if name and not isinstance(s, Exception)]
        return sorted(usable, key=lambda name: (name[:1].isupper(), name))

    def check(self, request: ServiceRequest) -> GenerationOptions:
        """The request's options with the model's defaults (its prompt without LoRA tags), checked;
        InvalidOptions lists every problem."""
        return self.prepare(request)[0]

    def prepare(self, request: ServiceRequest) -> tuple[GenerationOptions, list]:
        """(checked options, the LoRAs its prompt names); InvalidOptions lists every problem."""
        options = request.options.with_defaults(getattr(self.pipe, "recommended", {}))
        problems, loras = [], []
        try:
            prompt, loras = self.adapters.split_prompt(options.prompt)
            options = replace(options, prompt=prompt)
        except ValueError as error:
            problems.append(str(error))
        problems += options.problems(self.pipe.limits())
        if request.sampler is not None and request.sampler not in self.sampler_names:
            problems.append(f"Unknown sampler {request.sampler!r}: choose one of {', '.join(self.sampler_names)}.")
        else:
            scheduler = self.scheduler_for(request.sampler, request.schedule_type)
            if isinstance(scheduler, Exception):
                problems.append(f"Schedule type {request.schedule_type!r} with this sampler: {scheduler}")
            elif sampler_problem(options.guidance_method, scheduler):  # CFG++ takes single-step samplers
                problems.append(sampler_problem(options.guidance_method, scheduler))
        problems += self._refiner_problems(request.refiner_switch_at, options)
        if problems:
            raise InvalidOptions(" ".join(problems))
        return options, loras

    def _refiner_problems(self, switch_at, options: GenerationOptions) -> list[str]:
        if switch_at is None:
            return []
        if self.refiner is None:
            return ["No refiner is loaded: start the app with --refiner FOLDER (an SDXL refiner) to use one."]
        if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)) or not 0 < switch_at < 1:
            return [f"Refiner switch at must be a fraction strictly between 0 and 1 (e.g. 0.8), got {switch_at!r}."]
        if options.image is not None or options.hires is not None:
            return ["The refiner takes over text to image only: turn off the hires fix (or the refiner)."]
        return []

    def scheduler_for(self, sampler: str | None, schedule_type: str | None):
        """The prepared scheduler of `sampler` with `schedule_type` (None / "Automatic" = its own), or the
        error that makes the pair unusable for this model."""
        if schedule_type in (None, "Automatic"):
            return self.schedulers.get(sampler, self.pipe.scheduler)
        key = (sampler, schedule_type)
        with self.scheduled_lock:
            if key not in self.scheduled:
                try:
                    self.scheduled[key] = scheduler_with_schedule(self.pipe.scheduler, sampler, schedule_type)
                except (SchedulerSwapError, ValueError) as error:
                    self.scheduled[key] = error
            return self.scheduled[key]

    def request_pipe(self, sampler: str | None, schedule_type: str | None = None):
        """A pipeline sharing the loaded networks, with a fresh scheduler of the chosen kind."""
        prepared = self.scheduler_for(sampler, schedule_type)
        return pipe_copy(self.pipe, type(prepared).from_config(prepared.config))


    def previewer(self, mode: str = "cheap") -> LatentPreviewer | VaePreviewer:
        """"cheap": the latent -> RGB map, fitted to this model's VAE on first use (a few decodes);
        "full": the VAE decode itself."""
        if mode not in PREVIEW_MODES:
            raise ValueError(f"Unknown preview mode {mode!r}: choose one of {', '.join(PREVIEW_MODES)}.")
        if mode == "full":
            return VaePreviewer(self.pipe.vae, self.pipe._device, self.pipe._vae_precision)  # shared: as requests decode
        with self.preview_lock:
            if self.preview_map is None:
                self.preview_map = LatentPreviewer.fit(self.pipe.vae, self.pipe._device,
                                                       precision=self.pipe._vae_precision)
            return self.preview_map

    def generate(self, request: ServiceRequest, on_step=None, stop: threading.Event | None = None,
                 on_preview=None, preview_every: int | None = None, preview_mode: str = "cheap") -> list:
        """Make every image of a request; returns (written PNG, recipe) pairs.

        `on_step(done, total)` reports progress; setting `stop` ends the run after the current step
        (the images of the batches already finished are kept). With `preview_every` = N, every N steps
        `on_preview(step, total, images)` gets previews of the batch's current latents (`previews`:
        `preview_mode` "cheap" = the fitted latent -> RGB map, "full" = a VAE decode).
        """
        options, loras = self.prepare(request)
        pipe = self.request_pipe(request.sampler, request.schedule_type)
        refiner = None if request.refiner_switch_at is None else self.refiner.at(request.refiner_switch_at)
        pipe.embedding_records = self.adapters.used_embeddings(
            [t for t in (options.prompt, options.negative_prompt) if isinstance(t, str)])
        self.outputs.mkdir(parents=True, exist_ok=True)
        batches = request.seeds()
        results, done = [], 0
        per_batch = hires.steps_run(options) if options.hires is not None else None  # both passes
        per_batch = options.num_inference_steps if refiner is not None else per_batch  # base + refiner: the grid

        def callback(info) -> bool:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, (per_batch or info.num_steps) * len(batches))
            return stop is not None and stop.is_set()

        if preview_every:
            callback = preview_callback(self.previewer(preview_mode), preview_every, on_preview, callback,
                                        scale=pipe.vae_scale_factor)
        try:
            with self.adapters.using(loras, stop) as records:
                pipe.lora_records = records
                for seeds in batches:
                    batch = replace(options, seed=seeds, callback=callback, progress_bar=False)
                    out = refiner(pipe, batch) if refiner is not None else pipe(**batch.kwargs())
                    results += [(self.write(image, recipe), recipe) for image, recipe in zip(out.images, out.recipes)]
        except GenerationCancelled:
            pass  # the batches finished before the stop are kept
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
