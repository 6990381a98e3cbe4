"""`GenerationOptions`: the one description of a generation, from form or command line to the pipeline.

The pipeline call, a prompt line of `ldm-generate` and the web UI's form all become a
`GenerationOptions`; it

* knows its defaults: `with_defaults(pipe.recommended)` fills what the caller left out with
  the model's recommended settings (its `record.json`), then Stable Diffusion's 30 steps at 7.5;
* checks itself: `check(limits)` raises `InvalidOptions` (a `ValueError` and a `TypeError`)
  listing every problem, each naming the option and the fix, the same text on every surface;
* turns into the recipe stored in PNGs (`recipe_settings`) and back (`from_recipe`).

Limits (`ModelLimits`): width and height are multiples of 8 (or of the VAE factor, if larger)
up to `MAX_SIDE` pixels per side (2048, or the `LDM_MAX_SIDE` environment variable); steps go up
to the scheduler's `num_train_timesteps`; guidance scales are finite and at most `MAX_GUIDANCE`;
seeds are whole numbers from 0 to 2**63 - 1.

Seeds (`image_seeds`, `line_seed`): image j of a request gets seed + j; prompt line i of a batch
file gets base + 10000 * i; so an image depends only on its own seed.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import random
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Union

import numpy as np
import torch
from PIL import Image

from ldm_pipeline import metadata
from ldm_pipeline.guidance import SCHEDULE_ALIASES, SCHEDULE_NAMES, as_interval
from ldm_pipeline.guidance_methods import METHODS, PARAMETERS
from ldm_pipeline.hires import HiresFix, hires_problems
from ldm_pipeline.perturbed_attention import DEFAULT_LAYERS
from ldm_pipeline.prompt_weights import check_emphasis
from ldm_pipeline.step_callbacks import callback_problems

MAX_SIDE = int(os.environ.get("LDM_MAX_SIDE", "2048"))  # pixels per side, everywhere (pipeline, CLI, app)
MAX_GUIDANCE = 100.0  # far above any useful CFG scale; refuses typos such as 1e30
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
SEED_STRIDE = 10_000  # images per prompt line before the seeds of neighbouring lines meet
SD_DEFAULTS = {"num_inference_steps": 30, "guidance_scale": 7.5}  # when the model recommends nothing
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LABELS = {  # option -> the name users see in the app and the CLI help
    "num_inference_steps": "Steps", "guidance_scale": "Guidance scale", "guidance_min_scale": "Guidance minimum scale",
    "guidance_rescale": "Guidance rescale", "guidance_schedule": "Guidance schedule",
    "guidance_interval": "Guidance interval", "num_images_per_prompt": "Images per prompt", "clip_skip": "Clip skip",
    "guidance_method": "Guidance method", "apg_eta": "APG eta", "apg_norm_threshold": "APG norm threshold",
    "apg_momentum": "APG momentum", "cfg_zero_init_steps": "CFG-Zero* zero-init steps", "pag_scale": "PAG scale",
    "pag_layers": "PAG layers",
}


SDXL_OPTIONS = {"prompt_2": None, "negative_prompt_2": None, "original_size": None, "crops_coords_top_left": (0, 0),
                "target_size": None, "negative_original_size": None, "negative_crops_coords_top_left": None,
                "negative_target_size": None, "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5,
                "denoising_start": None, "denoising_end": None, "pooled_prompt_embeds": None,
                "negative_pooled_prompt_embeds": None}  # name -> default; refused on other models
SDXL_SIZES = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
              "negative_crops_coords_top_left", "negative_target_size")  # (height, width) or (top, left) pairs


class InvalidOptions(ValueError, TypeError):
    """Settings that cannot run; the message lists every problem, each naming the option and the fix."""


def label(name: str) -> str:
    """'Steps (num_inference_steps)' or 'Width': what users see, and the option's name."""
    return f"{LABELS[name]} ({name})" if name in LABELS else name.capitalize()


def is_whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelLimits:
    """What a loaded model can do: the size multiple, the most steps, the largest side, the CLIP depth."""

    size_multiple: int = 8
    max_steps: int = 1000
    max_side: int = MAX_SIDE
    clip_layers: int | None = None
    family: str = "sd"  # "sd" (1.x / 2.x) or "sdxl": which options the model takes

    @classmethod
    def of(cls, pipe) -> "ModelLimits":
        first = pipe.text_encoder if pipe.text_encoder is not None else pipe.text_encoder_2  # SDXL refiner: encoder 2
        encoder = getattr(first, "config", None)
        return cls(size_multiple=max(8, pipe.vae_scale_factor), max_steps=most_steps(pipe.scheduler.config),
                   clip_layers=getattr(encoder, "num_hidden_layers", None), family=getattr(pipe, "family", "sd"))


def most_steps(config) -> int:
    """The most sampler steps a scheduler config allows: its training timesteps, less `steps_offset` under
    "leading" spacing (diffusers' default), whose last timestep N - 1 + offset must still be a training one."""
    offset = config.get("steps_offset", 0) or 0 if config.get("timestep_spacing", "leading") == "leading" else 0
    return config["num_train_timesteps"] - offset


# ---------------------------------------------------------------- seeds


def image_seeds(seed: int | list[int] | None, count: int) -> list[int]:
    """One seed per image of a request: seed + j, the given list, or random ones (seed None)."""
    if seed is None:
        seed = random.randrange(2**31)
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise InvalidOptions(f"Got {len(seed)} seeds for {count} images; give one seed or one per image.")
        return [int(s) for s in seed]
    return [int(seed) + j for j in range(count)]


def line_seed(base: int, index: int) -> int:
    """The first seed of prompt line `index` (0-based) of a batch file."""
    return base + SEED_STRIDE * index


# ---------------------------------------------------------------- the record


@dataclass
class GenerationOptions:
    """Everything one generation takes (the pipeline's keyword arguments).

    prompt / negative_prompt   str or list (one negative, or one per prompt; None = "")
    prompt_embeds / negative_prompt_embeds   precomputed [B, 77*k, dim] instead of text
    num_inference_steps        sampler steps (img2img runs strength * steps of them); None = the model's default
    guidance_scale             CFG w (1 = conditional only); None = the model's default
    guidance_schedule          "constant" | "linear_up" | "linear_down" | "cosine" | "linear_down_to_half"
                               | callable(t/T) -> w  (see `guidance`)
    guidance_min_scale         w at the far end of the ramps
    guidance_interval          (sigma_lo, sigma_hi), GuidanceInterval or dict; None = every step
    guidance_rescale           phi (Lin et al. 2023); None = 0.7 for zero-terminal-SNR schedulers, else 0
    guidance_method            "cfg" | "apg" | "cfg++" | "cfg-zero*" (see `guidance_methods`); its parameters,
                               None = the method's default, refused with another method:
    apg_eta / apg_norm_threshold / apg_momentum   APG's parallel-part weight (0), norm threshold r (15; 0 = off)
                               and momentum beta (-0.5)
    cfg_zero_init_steps        CFG-Zero*'s zero-initialised first steps (1)
    pag_scale / pag_layers     perturbed-attention guidance (0 = off) and its UNet self-attention layers
                               (diffusers' names: "mid", "down_blocks.1", ...; default ["mid"])
    width / height             pixels, multiples of 8; None = the init image's size, else the UNet's native size
    seed                       int (image j gets seed + j), list of ints, or None (random)
    num_images_per_prompt      images for each prompt
    image / strength           img2img: init image (PIL, tensor in [-1, 1] or list) and strength in (0, 1]
    mask_image                 inpainting: white = repaint, black = keep (strength defaults to 1)
    clip_skip                  diffusers convention: 1 = penultimate CLIP layer
    emphasis                   A1111 prompt emphasis `(word:1.2)`, `[word]`, `BREAK`: "original" (scale, then
                               restore the mean), "no_norm", or "off" (plain text); see `prompt_weights`
    prompt_edit_steps          the steps A1111's prompt editing `[a:b:when]` counts over (None = the steps); the
                               hires fix sets its pass's steps, as A1111 does (not in recipes: `hires` is)
    cross_attention_kwargs     dict passed to the UNet's attention, as stock diffusers: {"scale": s} scales the
                               loaded LoRAs (UNet and text encoder; 0 = the base model)
    hires                      hires fix: `hires.HiresFix(scale, steps, strength, upscaler)` or its dict; text to
                               image at the base size, upscaled, then an img2img pass (see `hires`)
    output_type                "pil" | "np" | "pt" | "latent"
    prompt_2 / negative_prompt_2   SDXL only: the second text encoder's prompts (None = prompt / negative_prompt)
    original_size / crops_coords_top_left / target_size   SDXL only: size conditioning, (height, width) /
                               (top, left) / (height, width); None = (height, width), (0, 0), (height, width)
    negative_original_size / negative_crops_coords_top_left / negative_target_size   SDXL only: the
                               unconditional pass's size conditioning, used when both sizes are given
                               (crop None = (0, 0)), else the positive one (as stock diffusers; with an init
                               image each negative size defaults to the positive one, as stock img2img does)
    aesthetic_score / negative_aesthetic_score   SDXL refiners only (`requires_aesthetics_score`): the score
                               conditioning in place of the target size (stock defaults 6.0 / 2.5)
    denoising_end / denoising_start   SDXL base + refiner hand-off, fractions in (0, 1): the base stops
                               at `denoising_end` (output_type="latent"), the refiner takes those latents
                               as `image` and runs the steps below `denoising_start` (strength is ignored)
    pooled_prompt_embeds / negative_pooled_prompt_embeds   SDXL only, with prompt_embeds: encoder 2's
                               pooled, projected embedding [B, projection_dim]
    callback                   callable(StepInfo) -> bool | None; True cancels
    progress_bar               show a tqdm bar

    Stock diffusers arguments, with `StableDiffusionPipeline`'s meaning (see `noise_source` for what recipes record):
    generator                  torch.Generator or a list, one per image; takes precedence over `seed`
    latents                    initial noise [images, C, h, w] (scaled by init_noise_sigma); text-to-image and
                               full-strength inpainting only (stock img2img takes none)
    eta                        DDIM's eta (step noise), for samplers whose `step` takes it; None = the sampler's own
    timesteps / sigmas         a custom grid for samplers whose `set_timesteps` takes one; it sets the step count
    callback_on_step_end       callable(pipe, i, t, callback_kwargs) -> dict (see `step_callbacks`)
    callback_on_step_end_tensor_inputs   the tensors it receives: latents, prompt_embeds, negative_prompt_embeds
    return_dict                False: return the tuple (images, None) (None: no NSFW flags), as stock
    ip_adapter_image / ip_adapter_image_embeds   after `pipe.load_ip_adapter(...)`: one image (or embeddings)
                               per loaded adapter, as stock; the recipe records only that one was used

    A new option is one field here (with its default), its check in `problems`, and, if it
    changes the image, one key in `recipe_settings` / `metadata.recipe_to_options`.
    """

    prompt: Union[str, list[str], None] = None
    negative_prompt: Union[str, list[str], None] = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_schedule: Union[str, Callable[[float], float]] = "constant"
    guidance_min_scale: float = 1.0
    guidance_interval: Any = None
    guidance_rescale: float | None = None
    guidance_method: str = "cfg"
    apg_eta: float | None = None
    apg_norm_threshold: float | None = None
    apg_momentum: float | None = None
    cfg_zero_init_steps: int | None = None
    pag_scale: float = 0.0
    pag_layers: Union[str, list[str], tuple[str, ...]] = DEFAULT_LAYERS
    width: int | None = None
    height: int | None = None
    seed: Union[int, list[int], None] = None
    num_images_per_prompt: int = 1
    image: Any = None
    strength: float | None = None
    mask_image: Any = None
    clip_skip: int | None = None
    emphasis: str = "original"
    prompt_edit_steps: int | None = None
    cross_attention_kwargs: dict | None = None
    output_type: str = "pil"
    callback: Callable[..., Any] | None = None
    progress_bar: bool = True
    prompt_2: Union[str, list[str], None] = None
    negative_prompt_2: Union[str, list[str], None] = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    hires: Any = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    denoising_start: float | None = None
    denoising_end: float | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    generator: Union[torch.Generator, list[torch.Generator], None] = None
    latents: torch.Tensor | None = None
    eta: float | None = None
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    callback_on_step_end: Callable[..., Any] | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)
    return_dict: bool = True
    ip_adapter_image: Any = None
    ip_adapter_image_embeds: Any = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationOptions":
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidOptions(
                f"Unknown pipeline option(s) {', '.join(unknown)}; valid: {', '.join(f.name for f in fields(cls))}."
            )
        return cls(**kwargs)

    @classmethod
    def from_recipe(cls, recipe: dict, **extra) -> "GenerationOptions":
        """The options that regenerate a recipe's image (its scheduler: `scheduler_swap.scheduler_from_recipe`)."""
        return cls.from_kwargs(**{**metadata.recipe_to_options(recipe), **extra})

    def kwargs(self) -> dict:
        """The pipeline keyword arguments (`pipe(**options.kwargs())`), values shared, not copied."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_defaults(self, recommended: dict | None = None) -> "GenerationOptions":
        """Steps and guidance the caller left out: the model's recommended settings, then SD's."""
        defaults = {**SD_DEFAULTS, **{k: v for k, v in (recommended or {}).items() if k in SD_DEFAULTS}}
        if self.timesteps is not None or self.sigmas is not None:  # a custom grid sets the step count (the pipeline)
            del defaults["num_inference_steps"]
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def check(self, limits: ModelLimits = ModelLimits()) -> "GenerationOptions":
        """Raise `InvalidOptions` listing every problem; returns self when all is well."""
        problems = self.problems(limits)
        if problems:
            raise InvalidOptions(" ".join(problems))
        return self

    def problems(self, limits: ModelLimits = ModelLimits()) -> list[str]:
        return [*self._prompt_problems(), *self._count_problems(limits), *self._size_problems(limits),
                *self._guidance_problems(), *self._image_problems(), *self._seed_problems(),
                *self._sdxl_problems(limits), *self._stock_problems(), *self._hires_problems()]

    # ------------------------------------------------------------ the checks

    def prompt_list(self) -> list[str]:
        """The prompts (placeholders when embeddings are given)."""
        if self.prompt_embeds is not None:
            return ["<prompt_embeds>"] * self.prompt_embeds.shape[0]
        if not _is_text(self.prompt):
            return []
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt or [])

    def _prompt_problems(self) -> list[str]:
        problems = [f"{name} must be a string or a list of strings, got {type(value).__name__}."
                    for name, value in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt))
                    if not _is_text(value)]
        if problems:
            return problems
        if self.prompt_embeds is not None and self.prompt is not None:
            return ["Give either `prompt` or `prompt_embeds`, not both."]
        if self.prompt_embeds is None and not self.prompt_list():
            return ["No prompt: pass `prompt` (a string or list) or `prompt_embeds`."]
        if self.prompt_embeds is None and not all(p.strip() for p in self.prompt_list()):
            return ["The prompt is empty: type what the image should show."]
        return []

    def _count_problems(self, limits: ModelLimits) -> list[str]:
        problems = []
        steps = self.num_inference_steps
        if steps is not None and not (is_whole(steps) and 1 <= steps <= limits.max_steps):
            problems.append(f"{label('num_inference_steps')} must be a whole number from 1 to {limits.max_steps} "
                            f"(the scheduler's training timesteps), got {steps!r}.")
        if not (is_whole(self.num_images_per_prompt) and self.num_images_per_prompt >= 1):
            problems.append(f"{label('num_images_per_prompt')} must be a whole number >= 1, "
                            f"got {self.num_images_per_prompt!r}.")
        edit_steps = self.prompt_edit_steps
        if edit_steps is not None and not (is_whole(edit_steps) and edit_steps >= 1):
            problems.append(f"prompt_edit_steps must be a whole number >= 1 (or None = the steps), got {edit_steps!r}.")
        layers = limits.clip_layers
        if self.clip_skip is not None and not (is_whole(self.clip_skip) and 0 <= self.clip_skip < (layers or 2**31)):
            top = f" to {layers - 1}" if layers else " or more"
            problems.append(f"{label('clip_skip')} must be a whole number from 0{top} (layers skipped from the end "
                            f"of the text encoder), got {self.clip_skip!r}.")
        if check_emphasis(self.emphasis):
            problems.append(check_emphasis(self.emphasis))
        problems += _attention_kwargs_problems(self.cross_attention_kwargs)
        if self.output_type not in OUTPUT_TYPES:
            problems.append(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {self.output_type!r}.")
        return problems

    def _size_problems(self, limits: ModelLimits) -> list[str]:
        f, top = limits.size_multiple, limits.max_side
        return [f"{label(name)} must be a multiple of {f} (a whole number) from {f} to {top} pixels (LDM_MAX_SIDE "
                f"sets the maximum), "
                f"got {value!r}."
                for name, value in (("width", self.width), ("height", self.height))
                if value is not None and not (is_whole(value) and value % f == 0 and f <= value <= top)]

    def _guidance_problems(self) -> list[str]:
        problems = []
        for name in ("guidance_scale", "guidance_min_scale"):
            value = getattr(self, name)
            if value is not None and not (is_finite_number(value) and 0.0 <= value <= MAX_GUIDANCE):
                problems.append(f"{label(name)} must be a finite number from 0 to {MAX_GUIDANCE:g}, got {value!r}.")
        rescale = self.guidance_rescale
        if rescale is not None and not (is_finite_number(rescale) and 0.0 <= rescale <= 1.0):
            problems.append(f"{label('guidance_rescale')} must be from 0 to 1 (None = automatic), got {rescale!r}.")
        schedule = self.guidance_schedule
        if not callable(schedule) and schedule not in SCHEDULE_NAMES and schedule not in SCHEDULE_ALIASES:
            problems.append(f"Unknown guidance schedule {schedule!r}: choose one of {', '.join(SCHEDULE_NAMES)} "
                            "(or pass a callable t/T -> w).")
        try:
            as_interval(self.guidance_interval)
        except (ValueError, TypeError) as error:
            problems.append(str(error))
        return problems + self._method_problems() + self._pag_problems()

    def method_parameters(self) -> dict:
        """The guidance methods' parameters as given ({option: value or None})."""
        return {key: getattr(self, key) for keys in PARAMETERS.values() for key in keys}

    def _method_problems(self) -> list[str]:
        name, given = self.guidance_method, self.method_parameters()
        if name not in METHODS:
            return [f"Unknown guidance method (guidance_method) {name!r}: choose one of {', '.join(METHODS)}."]
        problems = [f"{label(key)} only applies to guidance_method={method!r}; leave it out with {name!r}."
                    for method, keys in PARAMETERS.items() for key in keys
                    if given[key] is not None and method != name]
        checks = {
            "apg_eta": (is_finite_number, "a finite number (1 keeps the parallel part, as CFG; 0 drops it)"),
            "apg_norm_threshold": (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0 (0 = off)"),
            "apg_momentum": (lambda v: is_finite_number(v) and -1 < v < 1, "above -1 and below 1 (e.g. -0.5)"),
            "cfg_zero_init_steps": (lambda v: is_whole(v) and v >= 0, "a whole number >= 0"),
        }
        problems += [f"{label(key)} must be {what}, got {given[key]!r}." for key, (ok, what) in checks.items()
                     if given[key] is not None and not ok(given[key])]
        k, steps = given["cfg_zero_init_steps"], self.num_inference_steps
        if name == "cfg-zero*" and is_whole(k) and is_whole(steps) and k >= steps:
            problems.append(f"{label('cfg_zero_init_steps')} ({k}) must be fewer than the steps ({steps}): "
                            "zero-initialised steps do not denoise.")
        return problems

    def pag_layer_list(self) -> list[str]:
        return [self.pag_layers] if isinstance(self.pag_layers, str) else list(self.pag_layers)

    def _pag_problems(self) -> list[str]:
        if not (is_finite_number(self.pag_scale) and 0.0 <= self.pag_scale <= MAX_GUIDANCE):
            return [f"{label('pag_scale')} must be a finite number from 0 to {MAX_GUIDANCE:g} (0 = off), "
                    f"got {self.pag_scale!r}."]
        layers = self.pag_layers
        if layers is None or not _is_text(layers) or not self.pag_layer_list() or not all(x.strip() for x in self.pag_layer_list()):
            return [f"{label('pag_layers')} must be UNet self-attention layer names (a string or a non-empty list, "
                    f"e.g. ['mid'] or ['down_blocks.2', 'up_blocks.0']), got {layers!r}."]
        return []

    def _image_problems(self) -> list[str]:
        problems = []
        if self.mask_image is not None and self.image is None:
            problems.append("Inpainting needs `image` as well as `mask_image`.")
        if self.strength is not None and not (is_finite_number(self.strength) and 0.0 < self.strength <= 1.0):
            problems.append(f"Strength (strength) must be above 0 and at most 1, got {self.strength!r}.")
        for name in ("image", "mask_image"):
            value = getattr(self, name)
            items = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(isinstance(v, (Image.Image, torch.Tensor, np.ndarray)) for v in items):
                problems.append(f"{name} must be a PIL image, a tensor, an array or a list of them, "
                                f"got {type(value).__name__}.")
        if self.callback is not None and not callable(self.callback):
            problems.append(f"callback must be callable, got {type(self.callback).__name__}.")
        return problems

    def _seed_problems(self) -> list[str]:
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]
        bad = [s for s in seeds if s is not None and not (is_whole(s) and 0 <= s <= MAX_SEED)]
        if not bad and self.seed is not None and not isinstance(self.seed, (list, tuple)):
            count = len(self.prompt_list()) * (self.num_images_per_prompt if is_whole(self.num_images_per_prompt) else 1)
            bad = [self.seed] if self.seed + count - 1 > MAX_SEED else []
        if not bad:
            return []
        return [f"Seed (seed) must be a whole number from 0 to 2**63 - 1 (image j gets seed + j), got {bad[0]!r}."]

    def _hires_problems(self) -> list[str]:
        if self.hires is not None and self.image is not None:
            return ["Hires fix is for text to image (as in A1111): leave out `hires` or `image`."]
        given = [name for name in ("generator", "latents", "timesteps", "sigmas") if getattr(self, name) is not None]
        if self.hires is not None and given:
            return [f"Hires fix runs from seeds with the sampler's own steps: leave out {', '.join(given)} "
                    "(give `seed`), or leave out `hires`."]
        return hires_problems(self.hires)

    def _sdxl_problems(self, limits: ModelLimits) -> list[str]:
        given = [name for name, default in SDXL_OPTIONS.items() if _differs(getattr(self, name), default)]
        if limits.family != "sdxl":
            return [f"{', '.join(given)} only apply to SDXL models (two text encoders, size conditioning); "
                    f"this is a {limits.family} model: leave them out or load an SDXL model."] if given else []
        problems = [f"{name} must be a string or a list of strings, got {type(getattr(self, name)).__name__}."
                    for name in ("prompt_2", "negative_prompt_2") if not _is_text(getattr(self, name))]
        for name in [n for n in given if n in SDXL_SIZES]:
            pair = getattr(self, name)
            if pair is not None and not (isinstance(pair, (tuple, list)) and len(pair) == 2
                                         and all(is_whole(v) and v >= 0 for v in pair)):
                problems.append(f"{name} must be two whole numbers >= 0 (height, width or top, left), got {pair!r}.")
        return problems + self._score_problems() + self._hand_off_problems() + self._pooled_problems()

    def _score_problems(self) -> list[str]:
        return [f"{name} must be a finite number, got {getattr(self, name)!r}."
                for name in ("aesthetic_score", "negative_aesthetic_score") if not is_finite_number(getattr(self, name))]

    def _hand_off_problems(self) -> list[str]:
        """denoising_end / denoising_start: fractions of the schedule, as stock SDXL takes them."""
        problems = [f"{name} must be a fraction strictly between 0 and 1 (e.g. 0.8), got {value!r}."
                    for name, value in (("denoising_start", self.denoising_start), ("denoising_end", self.denoising_end))
                    if value is not None and not (is_finite_number(value) and 0.0 < value < 1.0)]
        if problems:
            return problems
        if self.denoising_start is not None and self.image is None:
            problems.append("denoising_start needs `image`: the latents the base model left at denoising_end "
                            "(output_type='latent'), or an init image.")
        if None not in (self.denoising_start, self.denoising_end) and self.denoising_start >= self.denoising_end:
            problems.append(f"denoising_start ({self.denoising_start}) must be below denoising_end "
                            f"({self.denoising_end}).")
        return problems

    def _pooled_problems(self) -> list[str]:
        """SDXL's precomputed embeddings come in pairs, as stock requires."""
        pairs = (("prompt_embeds", "pooled_prompt_embeds"), ("negative_prompt_embeds", "negative_pooled_prompt_embeds"))
        problems = [f"{embeds} for an SDXL model needs {pooled} too (encoder 2's pooled embedding)."
                    for embeds, pooled in pairs
                    if getattr(self, embeds) is not None and getattr(self, pooled) is None]
        problems += [f"{pooled} is given without {embeds}." for embeds, pooled in pairs
                     if getattr(self, pooled) is not None and getattr(self, embeds) is None]
        if self.prompt_embeds is not None and (self.prompt_2 is not None):
            problems.append("Give either `prompt_2` or `prompt_embeds`, not both.")
        return problems

    def image_count(self) -> int:
        return len(self.prompt_list()) * (self.num_images_per_prompt if is_whole(self.num_images_per_prompt) else 1)

    def _stock_problems(self) -> list[str]:
        problems = [*_generator_problems(self.generator, self.image_count()), *self._latents_problems(),
                    *_grid_problems(self.timesteps, self.sigmas),
                    *callback_problems(self.callback_on_step_end, self.callback_on_step_end_tensor_inputs)]
        if self.eta is not None and not (is_finite_number(self.eta) and self.eta >= 0):
            problems.append(f"eta (DDIM's step noise) must be a finite number >= 0, got {self.eta!r}.")
        if not isinstance(self.return_dict, bool):
            problems.append(f"return_dict must be True or False, got {self.return_dict!r}.")
        return problems

    def _latents_problems(self) -> list[str]:
        if self.latents is None:
            return []
        if not isinstance(self.latents, torch.Tensor):
            return [f"latents must be a tensor [images, channels, height / 8, width / 8], "
                    f"got {type(self.latents).__name__}."]
        full_strength = self.mask_image is not None and (self.strength is None or self.strength >= 1.0)
        if self.image is not None and not full_strength:
            return ["latents (initial noise) cannot be combined with an init image below full strength: img2img "
                    "starts from the image noised to the first step (stock img2img takes no latents either); "
                    "leave latents out and use generator= or seed."]
        return []

    # ------------------------------------------------------------ recipes

    def settings(self) -> dict:
        """The JSON-ready settings that decide the image (no images, embeddings or callbacks)."""
        skip = {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds", "image", "mask_image", "callback", "progress_bar",
                "output_type", "generator", "latents", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
                "return_dict", "ip_adapter_image", "ip_adapter_image_embeds", "prompt_edit_steps"}
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        interval = as_interval(self.guidance_interval)
        values["guidance_interval"] = interval.as_dict() if interval else None
        for name in SDXL_SIZES:  # (height, width) pairs as JSON gives them back
            values[name] = list(values[name]) if isinstance(values[name], tuple) else values[name]
        if isinstance(self.hires, HiresFix):
            values["hires"] = self.hires.as_dict()
        values["pag_layers"] = self.pag_layer_list()
        return values

    def recipe_settings(self, size: tuple[int, int], strength: float | None, guidance: dict) -> dict:
        """The per-request part of a PNG recipe (prompt, negative and seed are per image)."""
        return {"steps": self.num_inference_steps, "width": size[0], "height": size[1], "clip_skip": self.clip_skip,
                "emphasis": self.emphasis, "strength": strength, "inpainting": self.mask_image is not None,
                "guidance": guidance, "eta": self.eta, "timesteps": grid_list(self.timesteps),
                "sigmas": grid_list(self.sigmas), "cross_attention_kwargs": self.cross_attention_kwargs}


def _attention_kwargs_problems(kwargs) -> list[str]:
    if kwargs is None:
        return []
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return [f"cross_attention_kwargs must be a dict with string keys (e.g. {{'scale': 0.8}}), got {kwargs!r}."]
    scale = kwargs.get("scale", 1.0)
    if not is_finite_number(scale):
        return [f"cross_attention_kwargs['scale'] (the LoRA scale) must be a finite number, got {scale!r}."]
    return []


def _differs(value, default) -> bool:
    """An option set away from its default (tensors compare by identity: any given tensor differs from None)."""
    return value is not None if default is None else value != default


def _generator_problems(generator, count: int) -> list[str]:
    if generator is None or isinstance(generator, torch.Generator):
        return []
    if not (isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator)):
        return [f"generator must be a torch.Generator or a list of them (one per image), got {generator!r}."]
    if count and len(generator) != count:
        return [f"Got {len(generator)} generators for {count} images; give one generator, or one per image "
                "(prompts x num_images_per_prompt)."]
    return []


def _grid_problems(timesteps, sigmas) -> list[str]:
    if timesteps is not None and sigmas is not None:
        return ["Give either timesteps or sigmas (a custom sampling grid), not both."]
    for name, grid in (("timesteps", timesteps), ("sigmas", sigmas)):
        values = grid_list(grid)
        if grid is not None and not (isinstance(values, list) and values and all(map(is_finite_number, values))):
            return [f"{name} must be a non-empty list of finite numbers (the sampler's grid), got {grid!r}."]
    return []


def grid_list(grid):
    """A grid given as a list, tuple, array or 1-d tensor, as a plain list (None stays None, others unchanged)."""
    if grid is None or isinstance(grid, (list, tuple)):
        return None if grid is None else list(grid)
    if isinstance(grid, (np.ndarray, torch.Tensor)) and grid.ndim == 1:
        return grid.tolist()
    return grid


def _is_text(value) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


# ---------------------------------------------------------------- init images


def as_rgb(image):
    """An init image as 8-bit RGB: transparency over white (as A1111 flattens), greyscale gains channels,
    16-bit/float is scaled to 8 bits."""
    if isinstance(image, (list, tuple)):
        return [as_rgb(i) for i in image]
    if not isinstance(image, Image.Image) or image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        top = 1.0 if image.mode == "F" and pixels.max() <= 1.0 else top
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")
