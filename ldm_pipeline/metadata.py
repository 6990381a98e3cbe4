"""Image metadata: the AUTOMATIC1111 `parameters` text chunk and our full JSON recipe.

A PNG written by `write_png` carries two text chunks:

* ``parameters``: the text AUTOMATIC1111's web UI writes, so existing PNG-info readers
  show it::

      a red circle
      Negative prompt: blurry
      Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, ...

* ``ldm_recipe``: the full recipe as JSON (prompt, seed, steps, size, guidance settings,
  scheduler class and config, model id and hash, library versions), enough to
  regenerate the image exactly.

`read_png(path)` returns both, parsed; `parse_parameters(text)` parses any A1111
parameters text (including ones A1111 wrote); `recipe_to_options(recipe)` turns a
recipe back into pipeline keyword arguments. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from custom_schedulers import names, registry
from ldm_pipeline.atomic import atomic_file
from ldm_pipeline.noise_source import explain_noise

RECIPE_KEY = "ldm_recipe"
PARAMETERS_KEY = "parameters"

# our emphasis mode -> A1111's "Emphasis" infotext value (A1111 writes it only when not "Original")
A1111_EMPHASIS = {"no_norm": "No norm", "off": "None"}

# A1111's parameter regex: `key: value` or `key: "json string"`, comma separated
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@functools.lru_cache(maxsize=1)
def _versions() -> tuple:
    return tuple(library_versions_uncached().items())


def library_versions() -> dict[str, str]:
    return dict(_versions())


def library_versions_uncached() -> dict[str, str]:
    versions = {}
    for name in ("ldm-toolkit", "diffusers", "torch", "transformers"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def backend_of(pipe) -> str:
    """"onnx" when the networks run in onnxruntime (the `onnx_backend` adapters say so), else "pytorch"."""
    return getattr(pipe.unet, "backend", "pytorch")


def model_record(pipe) -> dict:
    """The model's name (its folder or file name, as A1111's "Model:") and content hash, never its path:
    a shared PNG must not reveal where the model sits on the machine that made it."""
    model_id = getattr(pipe, "model_id", None)
    return {"name": Path(model_id).name if model_id else None, "hash": getattr(pipe, "model_hash", None)}


def make_recipe(pipe, generation: dict) -> dict:
    """The full recipe of one image: generation settings + scheduler + model + backend + versions."""
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    adapters = {"loras": pipe.active_lora_records(), "embeddings": pipe.embedding_records}
    backend = backend_of(pipe)
    versions = library_versions()
    if backend == "onnx":
        versions["onnxruntime"] = importlib_metadata.version("onnxruntime")
    return _json_safe({
        **generation,
        **{key: records for key, records in adapters.items() if records},  # set by `adapters`
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": config},
        "model": model_record(pipe),
        "backend": backend,
        "versions": versions,
    })


# ---------------------------------------------------------------- A1111 text


def _quote(text: str) -> str:
    """A1111's `quote`: JSON-quote a value that contains a comma, colon or newline."""
    text = str(text)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def sampler_name(scheduler_class: str, config: dict) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 1.9+ writes them (`custom_schedulers.names`)."""
    return registry.describe(scheduler_class, config)


def format_parameters(recipe: dict) -> str:
    """The A1111 `parameters` text for a recipe."""
    guidance = recipe.get("guidance") or {}
    scheduler = recipe.get("scheduler") or {}
    model = recipe.get("model") or {}
    sampler, schedule_type = sampler_name(scheduler.get("class", "?"), scheduler.get("config") or {})
    fields = {
        "Steps": recipe.get("steps"),
        "Sampler": sampler + (" CFG++" if (guidance.get("method") or {}).get("name") == "cfg++" else ""),
        "Schedule type": schedule_type,
        "CFG scale": guidance.get("scale"),
        "Seed": recipe.get("seed"),
        "Size": f"{recipe.get('width')}x{recipe.get('height')}",
        "Model hash": (model.get("hash") or "")[:10] or None,
        "Model": model.get("name") or (Path(model["id"]).name if model.get("id") else None),  # "id": older recipes
        "Denoising strength": recipe.get("strength"),
        "Clip skip": recipe["clip_skip"] + 1 if recipe.get("clip_skip") else None,  # A1111 counts from 1
        "CFG Rescale phi": guidance.get("rescale") or None,
        "Emphasis": A1111_EMPHASIS.get(recipe.get("emphasis")),
        "Guidance schedule": guidance.get("schedule") if guidance.get("schedule") not in (None, "constant") else None,
        "Guidance interval": json.dumps(guidance["interval"]) if guidance.get("interval") else None,
        "Backend": recipe.get("backend") if recipe.get("backend") not in (None, "pytorch") else None,
        # SDXL: A1111 writes nothing model-specific (size conditioning = the image size, crop 0, one prompt for
        # both encoders); our options beyond that, as JSON, only when set
        "SDXL options": json.dumps(recipe["sdxl"], ensure_ascii=False) if recipe.get("sdxl") else None,
        "Refiner": _refiner_name(recipe.get("refiner")),  # A1111: "Refiner: NAME [HASH10], Refiner switch at: 0.8"
        "Refiner switch at": (recipe.get("refiner") or {}).get("switch_at"),
        **guidance_method_fields(guidance),
        "Lora hashes": _hashes(recipe.get("loras")),
        "TI hashes": _hashes(recipe.get("embeddings")),
        **_hires_fields(recipe.get("hires")),
        **_xyz_fields(recipe.get("xyz")),
        "Version": "ldm-toolkit " + (recipe.get("versions") or {}).get("ldm-toolkit", "?"),
    }
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    text = prompt_with_lora_tags(recipe)
    if recipe.get("negative_prompt"):
        text += f"\nNegative prompt: {recipe['negative_prompt']}"
    return f"{text}\n{line}"


def _hires_fields(hires: dict | None) -> dict:
    """A1111's hires fix infotext: `Denoising strength: 0.5, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent`
    (steps only when not 0 = the base steps, as A1111 writes them)."""
    if not hires:
        return {}
    return {"Denoising strength": hires["strength"], "Hires upscale": f"{hires['scale']:g}",
            "Hires steps": hires["steps"] or None, "Hires upscaler": hires["upscaler"]}


def _xyz_fields(xyz: list[dict] | None) -> dict:
    """A1111's X/Y/Z plot grid infotext: `Script: X/Y/Z plot, X Type: Steps, X Values: "10,20", ...`."""
    if not xyz:
        return {}
    fields = {"Script": "X/Y/Z plot"}
    for letter, axis in zip("XYZ", xyz):
        fields.update({f"{letter} Type": axis["type"], f"{letter} Values": axis["values"]})
    return fields


def _refiner_name(refiner: dict | None) -> str | None:
    if not refiner:
        return None
    return f"{refiner['name']} [{refiner['hash'][:10]}]" if refiner.get("hash") else refiner["name"]


# A1111-style keys of our guidance methods' parameters (CFG++ is a suffix of the sampler, as in Forge: "Euler a CFG++")
METHOD_KEYS = {"apg_eta": "APG eta", "apg_norm_threshold": "APG norm threshold", "apg_momentum": "APG momentum",
               "cfg_zero_init_steps": "Zero-init steps"}


def guidance_method_fields(guidance: dict) -> dict:
    """The infotext fields of APG / CFG-Zero* (our own keys) and PAG (the keys of Forge's PAG extension)."""
    fields = {}
    method = dict(guidance.get("method") or {"name": "cfg"})
    if method["name"] not in ("cfg", "cfg++"):
        fields["Guidance method"] = method.pop("name")
        fields.update({METHOD_KEYS[key]: value for key, value in method.items()})
    pag = guidance.get("pag")
    if pag:
        fields.update(pag_enabled=True, pag_scale=pag["scale"])
        if pag["layers"] == ["mid"]:
            fields.update(pag_block="middle", pag_block_id=0)
        else:
            fields["PAG layers"] = json.dumps(pag["layers"])
    return fields


def guidance_method_parameters(params: dict) -> dict:
    """The guidance-method options named by A1111 text (`guidance_method_fields` read back)."""
    options = {}
    if params.get("Sampler", "").endswith(" CFG++"):
        options["guidance_method"] = "cfg++"
    if "Guidance method" in params:
        options["guidance_method"] = params["Guidance method"]
        kinds = {"cfg_zero_init_steps": int}
        options.update({key: kinds.get(key, float)(params[label]) for key, label in METHOD_KEYS.items()
                        if label in params})
    if params.get("pag_enabled", "True") == "True" and "pag_scale" in params:
        # Forge's input/output block ids count LDM blocks, not diffusers' layers: only "middle" maps
        middle = params.get("pag_block", "middle") == "middle"
        layers = json.loads(params["PAG layers"]) if "PAG layers" in params else ["mid"] if middle else None
        options.update({"pag_scale": float(params["pag_scale"]), "pag_layers": layers} if layers else {})
    return options


def prompt_with_lora_tags(recipe: dict) -> str:
    """The recipe's prompt with its LoRAs as A1111 writes them in the infotext: `... <lora:NAME:W>`
    (so A1111, and our PNG info and history, restore them; the recipe's `prompt` is the text encoded)."""
    return recipe.get("prompt", "") + _lora_tags(recipe.get("loras"))


def _lora_tags(records: list[dict] | None) -> str:
    """A1111 keeps `<lora:NAME:W>` in the prompt (its `Lora hashes` names those tags); our recipe prompt has
    them taken out (`adapters.prompt_loras`), so the infotext puts them back: names only, never paths."""
    scales = [r.get("scale", 1.0) for r in records or []]  # block-wise weights (a dict) have no A1111 tag
    return "".join(f" <lora:{r['name']}:{w:g}>" for r, w in zip(records or [], scales) if isinstance(w, (int, float)))


def _hashes(records: list[dict] | None) -> str | None:
    """A1111's `Lora hashes` / `TI hashes` value: "name: hash, name2: hash2" (':' and ',' dropped from names)."""
    known = [r for r in records or [] if r.get("hash")]  # a LoRA loaded from a state dict has no file to hash
    if not known:
        return None
    return ", ".join(f"{r['name'].replace(':', '').replace(',', '')}: {r['hash']}" for r in known)


def parse_parameters(text: str) -> dict:
    """Parse A1111 `parameters` text into {"Prompt", "Negative prompt", "Steps", ...} (values as text)."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in RE_PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        result[key.strip()] = value
    if "Size" in result and "x" in result["Size"]:
        result["Size-1"], result["Size-2"] = result["Size"].split("x", 1)
    return result


def parameters_to_options(params: dict) -> dict:
    """Pipeline keyword arguments from parsed A1111 parameters (the keys both know)."""
    options = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt") or None}
    conversions = {"Steps": ("num_inference_steps", int), "CFG scale": ("guidance_scale", float),
                   "Seed": ("seed", int), "Size-1": ("width", int), "Size-2": ("height", int),
                   "Denoising strength": ("strength", float), "CFG Rescale phi": ("guidance_rescale", float)}
    for key, (name, kind) in conversions.items():
        if key in params:
            options[name] = kind(params[key])
    if "Clip skip" in params:
        options["clip_skip"] = int(params["Clip skip"]) - 1
    options.update(sampler_options({**params, "Sampler": params["Sampler"].removesuffix(" CFG++")}
                                   if "Sampler" in params else params))
    options.update(guidance_method_parameters(params))
    if "Hires upscale" in params:  # A1111 txt2img with hires fix: its denoising strength is the hires pass'
        options["hires"] = {"scale": float(params["Hires upscale"]), "steps": int(params.get("Hires steps", 0)),
                            "strength": float(options.pop("strength", 0.7)),
                            "upscaler": params.get("Hires upscaler", "Latent")}
    if "SDXL options" in params:
        options.update(_sdxl_options(json.loads(params["SDXL options"])))
    if "Emphasis" in params:  # absent: A1111's "Original", which is our default too
        options["emphasis"] = {label: mode for mode, label in A1111_EMPHASIS.items()}.get(params["Emphasis"], "original")
    return options


def sampler_options(params: dict) -> dict:
    """{"scheduler": registry name, "scheduler_options": its schedule fields} from A1111's `Sampler` and
    `Schedule type` (or a ` Karras` suffix); empty when the PNG names no sampler or one we do not know."""
    if "Sampler" not in params:
        return {}
    schedule = params.get("Schedule type")
    found = names.resolve(params["Sampler"], None if schedule in (None, "Automatic") else schedule)
    if found is None:
        return {}
    try:
        overrides = names.schedule_overrides(found[1], stock=not registry.is_ours(found[0]))
    except ValueError:  # a schedule type we do not have: the sampler with its own levels
        overrides = {}
    return {"scheduler": found[0], "scheduler_options": overrides}


def explain_ip_adapter(record) -> str:
    """An IP-Adapter record in words (recipes before the record held `true`)."""
    if not isinstance(record, dict):
        return "image not recorded"
    kind = "image" if "image_sha256" in record else "image embeddings"
    digest = record.get("image_sha256") or record.get("embeds_sha256") or "?"
    return f"{kind} sha256 {digest[:12]}, scale {record.get('scale')}"


def recipe_to_options(recipe: dict) -> dict:
    """Pipeline keyword arguments that regenerate a recipe's image (scheduler: swap separately)."""
    guidance = recipe.get("guidance") or {}
    if recipe.get("noise"):
        raise ValueError(f"This recipe's image cannot be regenerated from its seed: {explain_noise(recipe['noise'])}.")
    if recipe.get("ip_adapter"):
        raise ValueError(f"This image was made with an IP-Adapter ({explain_ip_adapter(recipe['ip_adapter'])}); "
                         "the recipe does not hold its image: load the same IP-Adapter and scale and pass that "
                         "image as ip_adapter_image.")
    if recipe.get("altered_by"):
        raise ValueError(f"A callback_on_step_end ({recipe['altered_by']}) changed this image's tensors during "
                         "sampling; the recipe cannot replay it.")
    options = {
        "prompt": recipe["prompt"], "negative_prompt": recipe.get("negative_prompt") or None,
        "num_inference_steps": recipe["steps"], "seed": recipe["seed"],
        "width": recipe["width"], "height": recipe["height"], "clip_skip": recipe.get("clip_skip"),
        "guidance_scale": guidance.get("scale", 7.5), "guidance_rescale": guidance.get("rescale", 0.0),
        "guidance_min_scale": guidance.get("min_scale", 1.0), "guidance_interval": guidance.get("interval"),
        "emphasis": recipe.get("emphasis", "off"),  # recipes from before emphasis read prompts as plain text
        "eta": recipe.get("eta"), "timesteps": recipe.get("timesteps"), "sigmas": recipe.get("sigmas"),
        "cross_attention_kwargs": recipe.get("cross_attention_kwargs"),  # the LoRA scale; the LoRAs: `loras`
    }
    options.update(_sdxl_options(recipe.get("sdxl") or {}))
    schedule = guidance.get("schedule", "constant")
    if schedule.startswith("callable:"):
        raise ValueError(f"The recipe used a custom guidance function ({schedule}); it cannot be restored from JSON.")
    options["guidance_schedule"] = schedule
    if recipe.get("hires"):
        options["hires"] = recipe["hires"]
    return {**options, **guidance_method_options(guidance)}


def guidance_method_options(guidance: dict) -> dict:
    """The guidance method and PAG options of a recipe's guidance entry (none: plain CFG, no PAG)."""
    method = dict(guidance.get("method") or {"name": "cfg"})
    options = {"guidance_method": method.pop("name"), **method}
    if guidance.get("pag"):
        options.update(pag_scale=guidance["pag"]["scale"], pag_layers=guidance["pag"]["layers"])
    return options


def _sdxl_options(settings: dict) -> dict:
    """A recipe's `sdxl` settings as options: (height, width) / (top, left) pairs back to tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


# ---------------------------------------------------------------- PNG files


def write_png(path: str | os.PathLike, image: Image.Image, recipe: dict) -> Path:
    """Write `image` with the parameters and recipe chunks, atomically (temp file + rename)."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, format_parameters(recipe))
    info.add_text(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False, sort_keys=True))
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


@dataclass
class PngMetadata:
    parameters_text: str | None
    parameters: dict | None  # parsed A1111 fields
    recipe: dict | None  # our JSON recipe, if the image came from this toolkit


def read_png(path: str | os.PathLike) -> PngMetadata:
    """The parameters (ours or A1111's) and recipe stored in a PNG."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or image.info)
    raw = text.get(PARAMETERS_KEY)
    recipe = json.loads(text[RECIPE_KEY]) if RECIPE_KEY in text else None
    return PngMetadata(raw, parse_parameters(raw) if raw else None, recipe)
