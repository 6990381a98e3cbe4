"""Hires fix (AUTOMATIC1111's two-pass txt2img): generate at the base size, upscale, refine with img2img.

    pipe("a red circle", width=64, height=64, hires=HiresFix(scale=2, steps=10, strength=0.5, upscaler="Latent"))

1. the base pass: text-to-image at width x height, kept as latents;
2. the upscale, to (width * scale, height * scale) rounded down to the model's size multiple:
   a **latent** upscaler interpolates the latents (`torch.nn.functional.interpolate`, A1111's
   "Latent" = bilinear, "Latent (nearest)", "Latent (nearest-exact)", "Latent (bicubic)", each also
   "... antialiased"), a **pixel** upscaler decodes, resizes with PIL ("Lanczos", "Nearest") and the
   img2img pass encodes again;
3. the hires pass: the pipeline's own img2img path at the upscaled size with the same prompts and seeds,
   `strength` (A1111's "Denoising strength") and `steps` sampler steps actually run (0 = the base
   steps): as A1111's `setup_img2img_steps` with explicit steps, the schedule has
   ceil(steps / strength) steps of which the last `steps` run.

The settings are part of `GenerationOptions` (`hires`: a `HiresFix` or its dict); recipes record them
under "hires" and A1111's infotext as `Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent,
Denoising strength: 0.5`, so `GenerationOptions.from_recipe` regenerates the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

# A1111 upscaler name -> ("latent", interpolate mode, antialias) or ("pixel", PIL filter)
UPSCALERS = {
    "Latent": ("latent", "bilinear", False),
    "Latent (antialiased)": ("latent", "bilinear", True),
    "Latent (bicubic)": ("latent", "bicubic", False),
    "Latent (bicubic antialiased)": ("latent", "bicubic", True),
    "Latent (nearest)": ("latent", "nearest", False),
    "Latent (nearest-exact)": ("latent", "nearest-exact", False),
    "Lanczos": ("pixel", Image.Resampling.LANCZOS),
    "Nearest": ("pixel", Image.Resampling.NEAREST),
}
MAX_SCALE = 8.0


def _key(name: str) -> str:
    """"Latent (nearest-exact)", "latent-nearest-exact" and "latent_nearest exact" are one name."""
    return " ".join(name.lower().replace("(", " ").replace(")", " ").replace("_", " ").replace("-", " ").split())


_BY_KEY = {_key(name): name for name in UPSCALERS}


def upscaler_name(name: str) -> str:
    """The A1111 name of an upscaler given in any spelling ("latent-nearest" -> "Latent (nearest)")."""
    found = _BY_KEY.get(_key(name)) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"Unknown hires upscaler {name!r}: choose one of {', '.join(UPSCALERS)}.")
    return found


@dataclass(frozen=True)
class HiresFix:
    """scale: upscale factor (> 1); steps: img2img steps run (0 = the base steps); strength: denoising
    strength of the hires pass in (0, 1]; upscaler: a name of `UPSCALERS` (any spelling)."""

    scale: float = 2.0
    steps: int = 0
    strength: float = 0.7
    upscaler: str = "Latent"

    def as_dict(self) -> dict:
        return asdict(self)

    def target_size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        """(width, height) * scale, rounded down to the size multiple (A1111: int(width * scale))."""
        return tuple(int(side * self.scale) // multiple * multiple for side in (width, height))


def hires_problems(value) -> list[str]:
    """What is wrong with a `hires` option (None, a HiresFix or its dict), each naming the fix."""
    if value is None:
        return []
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(HiresFix.__dataclass_fields__))
        if unknown:
            return [f"Unknown hires fix key(s) {', '.join(unknown)}: use scale, steps, strength, upscaler."]
        value = HiresFix(**value)
    if not isinstance(value, HiresFix):
        return [f"hires must be a HiresFix, a dict of its fields or None, got {type(value).__name__}."]
    return _value_problems(value)


def _value_problems(hires: HiresFix) -> list[str]:
    problems = []
    number = (int, float)
    if not (isinstance(hires.scale, number) and not isinstance(hires.scale, bool)
            and math.isfinite(hires.scale) and 1.0 < hires.scale <= MAX_SCALE):
        problems.append(f"Hires upscale must be a number above 1 and at most {MAX_SCALE:g}, got {hires.scale!r}.")
    if not (isinstance(hires.steps, int) and not isinstance(hires.steps, bool) and hires.steps >= 0):
        problems.append(f"Hires steps must be a whole number >= 0 (0 = the base steps), got {hires.steps!r}.")
    if not (isinstance(hires.strength, number) and not isinstance(hires.strength, bool)
            and 0.0 < hires.strength <= 1.0):
        problems.append(f"Hires denoising strength must be above 0 and at most 1, got {hires.strength!r}.")
    try:
        upscaler_name(hires.upscaler)
    except ValueError as error:
        problems.append(str(error))
    return problems


def as_hires(value) -> HiresFix | None:
    """A checked HiresFix (upscaler under its A1111 name) from None, a HiresFix or a dict."""
    problems = hires_problems(value)
    if problems:
        raise ValueError(" ".join(problems))
    if value is None:
        return None
    hires = HiresFix(**value) if isinstance(value, dict) else value
    return replace(hires, scale=float(hires.scale), strength=float(hires.strength),
                   upscaler=upscaler_name(hires.upscaler))


def schedule_steps(run: int, strength: float) -> int:
    """The schedule length whose img2img pass at `strength` runs exactly `run` steps (int(total * strength))."""
    total = max(run, math.ceil(run / strength - 1e-9))
    while int(total * strength) < run:
        total += 1
    return total


def steps_run(opts) -> int:
    """Sampler steps of both passes for checked options with defaults (a progress bar's total)."""
    hires = as_hires(opts.hires)
    return opts.num_inference_steps + (hires.steps or opts.num_inference_steps)


def upscale(pipe, latents: torch.Tensor, size: tuple[int, int], upscaler: str):
    """The hires pass' init image: interpolated latents, or decoded images resized with PIL."""
    kind, *how = UPSCALERS[upscaler]
    width, height = size
    if kind == "latent":
        mode, antialias = how
        f = pipe.vae_scale_factor
        return F.interpolate(latents, size=(height // f, width // f), mode=mode, antialias=antialias)
    images = pipe._decode(latents, "pil")
    return [image.resize(size, resample=how[0]) for image in images]


def generate(pipe, opts):
    """Both passes for checked options with `opts.hires` set (the pipeline's `__call__` sends them here)."""
    from ldm_pipeline.options import InvalidOptions

    hires = as_hires(opts.hires)
    base = pipe(**replace(opts, hires=None, output_type="latent", return_dict=True).kwargs())
    limits = pipe.limits()
    width, height = hires.target_size(base.recipes[0]["width"], base.recipes[0]["height"], limits.size_multiple)
    steps = schedule_steps(hires.steps or opts.num_inference_steps, hires.strength)
    if max(width, height) > limits.max_side or steps > limits.max_steps:
        raise InvalidOptions(
            f"Hires fix: {width}x{height} pixels with {steps} scheduled steps exceeds this model's limits "
            f"({limits.max_side} pixels per side, {limits.max_steps} steps): lower the hires upscale, or raise "
            "the hires strength / lower the hires steps.")
    init = upscale(pipe, base.images, (width, height), hires.upscaler)
    second = pipe(**replace(opts, hires=None, image=init, strength=hires.strength, num_inference_steps=steps,
                            prompt_edit_steps=hires.steps or opts.num_inference_steps,  # A1111's hires conds
                            width=width, height=height, seed=base.seeds, return_dict=True).kwargs())
    if not opts.return_dict:
        return second.images, None  # stock's (images, nsfw_content_detected)
    recipes = [{**recipe, "hires": hires.as_dict()} for recipe in base.recipes]
    return type(second)(images=second.images, seeds=second.seeds, recipes=recipes,
                        unet_evaluations=base.unet_evaluations + second.unet_evaluations)

