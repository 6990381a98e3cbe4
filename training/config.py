"""Typed training options, the command line built from them, and config files.

One source of truth: the dataclasses below. Each field becomes a `--flag` of the
same name (diffusers' `train_text_to_image.py` names where the concept exists),
its type gives the parser type, its `help` metadata the `--help` text. A YAML or
JSON `--config` file holds the same flat keys; flags given on the command line
override the file, the file overrides the defaults. The merged result is one
`TrainConfig`, saved as `config.json` in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def option(default: Any, help: str, *aliases: str) -> Any:
    """A dataclass field with command-line help (and optional extra flag names)."""
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**factory, metadata={"help": help, "aliases": aliases})


# ---------------------------------------------------------------- what is trained: data


@dataclass
class DataOptions:
    dataset: Literal["shapes", "folder"] = option(
        "shapes", "'shapes' (built-in generator) or 'folder' (an image folder; implied by --train_data_dir)."
    )
    train_data_dir: str | None = option(
        None, "Image folder with captions: metadata.jsonl ({'file_name', 'text'}) or a .txt beside each image."
    )
    image_column: str = option("file_name", "metadata.jsonl key holding the image file name.")
    caption_column: str = option("text", "metadata.jsonl key holding the caption.")
    num_train_samples: int = option(20000, "shapes: size of the seeded training pool (train split, paraphrased).")
    shapes_colors: list[str] | None = option(
        None, "shapes: only these shape colours (a curriculum stage; default: all eight)."
    )
    shapes_backgrounds: list[str] | None = option(
        None, "shapes: only these background colours (a curriculum stage; default: all eight)."
    )
    num_validation_samples: int = option(64, "Held-out samples for the deterministic validation loss.")
    resolution: int = option(64, "Training resolution (square); must be divisible by the VAE's downsampling factor.")
    center_crop: bool = option(False, "Center crop after resizing (default: random crop).")
    random_flip: bool = option(False, "Random horizontal flips (off by default: left/right are attributes).")
    proportion_empty_prompts: float = option(
        0.1, "Caption dropout: probability of training on the empty caption (for classifier-free guidance).",
        "--caption_dropout",
    )
    cache_latents: bool = option(
        False, "Encode the data once with the frozen VAE and train on cached latents (SDXL with frozen text encoders "
        "and fixed captions: both encoders' caption embeddings are cached too)."
    )
    dataloader_num_workers: int = option(0, "DataLoader worker processes (0: load in the main process).")


# ---------------------------------------------------------------- what is trained: model


@dataclass
class ModelOptions:
    pretrained_model_name_or_path: str | None = option(
        None, "A diffusers Stable Diffusion or SDXL folder (detected from its components), or a single "
        ".safetensors checkpoint, to start from."
    )
    from_scratch: str | None = option(
        None, "Folder of small configs to build new models: unet.json, vae.json, text_encoder.json "
        "(vocab_size and token ids are filled in from a tokenizer built from the dataset's words).",
    )
    single_file_config: str | None = option(
        None, "For a single-file checkpoint: a local diffusers folder of the same architecture (configs, tokenizer)."
    )
    pretrained_vae: str | None = option(None, "A trained AutoencoderKL folder (or a folder with vae/) to use frozen.")
    train_vae: bool = option(False, "Train the AutoencoderKL (reconstruction + KL) instead of the diffusion model.")
    vae_kl_weight: float = option(1e-6, "--train_vae: weight of the KL term (LDM's autoencoder uses 1e-6).")
    train_text_encoder: bool = option(False, "Train the text encoder (SDXL: both) jointly with the UNet.")
    lora_rank: int | None = option(None, "Train LoRA adapters of this rank (peft) instead of the full UNet.")
    lora_alpha: float | None = option(None, "LoRA alpha (default: equal to the rank).")
    allow_pickle: bool = option(
        False, "Allow loading pickle files: .ckpt/.bin models, and resume checkpoints in accelerate's pickle format "
        "(unsafe: a pickle can run code; off by default).",
    )


# ---------------------------------------------------------------- what is trained: objective


@dataclass
class ObjectiveOptions:
    prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] | None = option(
        None, "What the UNet predicts (default: the model's scheduler config, or v_prediction from scratch)."
    )
    noise_schedule: Literal["scaled_linear", "linear", "cosine", "sigmoid"] | None = option(
        None, "VP noise schedule (default: the model's scheduler config, or scaled_linear)."
    )
    zero_terminal_snr: bool = option(
        False, "Rescale the schedule to zero terminal SNR (Lin et al. 2023); needs v_prediction/sample/flow."
    )
    num_train_timesteps: int = option(1000, "Training timesteps (from scratch; otherwise from the scheduler config).")
    snr_gamma: float | None = option(None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is recommended.")
    snr_floor: float | None = option(
        None, "Min-SNR: lower bound of the x0-space weight for v/sample/flow (1.0 = truncated SNR, Salimans & Ho "
        "2022); recommended with --zero_terminal_snr, whose pure-noise step otherwise gets weight 0.",
    )
    noise_offset: float = option(0.0, "Noise offset: add this times per-channel N(0,1) to the noise.")
    input_perturbation: float = option(0.0, "Input perturbation (Ning et al. 2023): noise the input with eps + g*xi.")
    timestep_sampling: Literal["uniform", "logit_normal"] = option(
        "uniform", "How noise levels are drawn (logit_normal: Esser et al. 2024, SD3; for VP, s*T picks the timestep)."
    )
    logit_mean: float = option(0.0, "logit_normal: mean of the normal before the sigmoid.")
    logit_std: float = option(1.0, "logit_normal: standard deviation of the normal before the sigmoid.")
    flow_shift: float = option(1.0, "flow: resolution shift of the noise levels (SD3 Sec. 5.3.2).")


# ---------------------------------------------------------------- how this run executes


@dataclass
class OptimizationOptions:
    train_batch_size: int = option(16, "Batch size per process.")
    max_train_steps: int = option(1000, "Optimizer steps to train for.")
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.")
    learning_rate: float = option(1e-4, "Peak learning rate.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = option("constant_with_warmup", "Learning-rate schedule (diffusers.optimization).")
    lr_warmup_steps: int = option(0, "Linear warm-up steps.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    use_ema: bool = option(False, "Keep an exponential moving average of the trained weights (saved as output).")
    ema_decay: float = option(0.9999, "EMA maximum decay.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "Mixed precision (accelerate).")
    seed: int = option(0, "Seed for models, data order, noise and timesteps.")


@dataclass
class RunOptions:
    output_dir: str = option("runs/train", "Run directory: config.json, checkpoints/, logs/ and the final model.")
    checkpointing_steps: int = option(500, "Save an accelerate checkpoint every N steps.")
    checkpoints_total_limit: int | None = option(3, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = option(None, "A checkpoint folder, or 'latest' in output_dir.")
    validation_steps: int = option(200, "Validation loss (and images, with prompts) every N steps.")
    validation_prompts: list[str] = option([], "Prompts for validation image grids.")
    validation_inference_steps: int = option(20, "Sampler steps for validation images.")
    validation_guidance_scale: float = option(3.0, "Guidance scale for validation images.")
    logging_steps: int = option(10, "Log loss, lr and grad norm every N steps.")
    report_to: Literal["tensorboard", "none"] = option("tensorboard", "Where metrics go.")
    dry_run: bool = option(False, "Print the resolved config and exit without training.")
    test_run: bool = option(False, "Build everything, run one step, save the output, exit.")


# ---------------------------------------------------------------- fine-tuning as kohya users do (issue 20)


@dataclass
class FineTuneDataOptions:
    enable_bucket: bool = option(
        False, "Aspect-ratio bucketing (kohya): batches of one bucket each, buckets of about resolution^2 pixels."
    )
    bucket_reso_steps: int = option(64, "Bucket sides are multiples of this (a multiple of the latent downsampling).")
    min_bucket_reso: int | None = option(None, "Smallest bucket side (default: resolution/2, rounded to the step).")
    max_bucket_reso: int | None = option(None, "Largest bucket side (default: 2 * resolution).")
    hf_dataset: str | None = option(
        None, "A local Hugging Face dataset to train on: a folder saved with save_to_disk, or an image folder read "
        "by load_dataset('imagefolder') (--image_column defaults to its image column, --caption_column 'text')."
    )
    webdataset_shards: list[str] = option(
        [], "WebDataset tar shards (paths or glob patterns; <key>.png/jpg + <key>.txt), streamed; processes read "
        "disjoint shards (at least one shard per process)."
    )
    shuffle_caption: bool = option(False, "Shuffle the comma-separated tags of each caption every time it is seen.")
    keep_tokens: int = option(0, "Keep the first N tags of each caption in place (not shuffled, never dropped).")
    caption_tag_dropout_rate: float = option(0.0, "Drop each (not kept) tag of a caption with this probability.")
    record_data_order: bool = option(
        False, "Write the (dataset index, stream position) pairs each process trains on, one line per micro-batch, "
        "to data_order-rank<R>.jsonl in the run directory (an audit of the data order)."
    )


@dataclass
class FineTuneModelOptions:
    lora_type: Literal["lora", "loha", "lokr"] = option(
        "lora", "Adapter kind with --lora_rank (peft): LoRA, LoHa (Hadamard product) or LoKr (Kronecker product)."
    )
    use_dora: bool = option(False, "DoRA: weight-decomposed LoRA (Liu et al. 2024); --lora_type lora only.")
    lora_format: Literal["diffusers", "kohya", "both", "peft"] = option(
        "both", "Adapter file format(s) in output_dir/lora: diffusers (pytorch_lora_weights.safetensors), kohya "
        "(A1111/ComfyUI keys, pytorch_lora_weights_kohya.safetensors), both, or peft (adapter folders; LoHa/LoKr)."
    )
    text_encoder_lr: float | None = option(
        None, "Learning rate of the text encoder (or its LoRA) with --train_text_encoder (default: --learning_rate)."
    )
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion", "schedulefree_adamw"] = option(
        "adamw", "Optimizer by name (see training/optimizers.py)."
    )
    optimizer_args: list[str] = option(
        [], "Extra optimizer options as key=value (e.g. d_coef=0.5; values read as YAML)."
    )


@dataclass
class FineTuneLossOptions:
    masked_loss: bool = option(
        False, "Weight each latent pixel's loss by a mask (white = learn, black = ignore) from --conditioning_data_dir."
    )
    conditioning_data_dir: str | None = option(
        None, "--masked_loss: folder of grayscale masks, one per training image with the same file stem."
    )
    debiased_estimation_loss: bool = option(
        False, "Debiased estimation (Yu et al. 2024): weight the epsilon-space loss by 1/sqrt(SNR)."
    )
    multires_noise_iterations: int = option(0, "Multi-resolution noise (Whitaker 2023): levels added (6-10 typical).")
    multires_noise_discount: float = option(0.3, "Multi-resolution noise: weight of level i is discount^i.")


@dataclass
class DreamBoothOptions:
    instance_prompt: str | None = option(None, "Caption of every training image, e.g. 'a photo of sks dog' (DreamBooth).")
    with_prior_preservation: bool = option(
        False, "DreamBooth prior preservation (Ruiz et al. 2023): also train on generated class images."
    )
    class_prompt: str | None = option(None, "Prompt of the class images, e.g. 'a photo of a dog'.")
    num_class_images: int = option(100, "Class images generated (once, cached) and trained on.")
    prior_loss_weight: float = option(1.0, "Weight of the class-image loss.")
    class_data_dir: str | None = option(None, "Where class images are cached (default: output_dir/class_images).")


@dataclass
class TextualInversionOptions:
    placeholder_token: str | None = option(
        None, "Textual inversion (Gal et al. 2023): train only the embedding of this new token, e.g. '<sks>' "
        "(use it in the captions or --instance_prompt)."
    )
    initializer_token: str | None = option(None, "A one-token word whose embedding starts the new token's, e.g. 'dog'.")
    num_vectors: int = option(1, "Embedding vectors of the new token.")


GROUPS = {
    "data": DataOptions,
    "model": ModelOptions,
    "objective": ObjectiveOptions,
    "optimization": OptimizationOptions,
    "run": RunOptions,
    "finetune_data": FineTuneDataOptions,
    "finetune_model": FineTuneModelOptions,
    "finetune_loss": FineTuneLossOptions,
    "dreambooth": DreamBoothOptions,
    "textual_inversion": TextualInversionOptions,
}


@dataclass
class TrainConfig:
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    optimization: OptimizationOptions = field(default_factory=OptimizationOptions)
    run: RunOptions = field(default_factory=RunOptions)
    finetune_data: FineTuneDataOptions = field(default_factory=FineTuneDataOptions)
    finetune_model: FineTuneModelOptions = field(default_factory=FineTuneModelOptions)
    finetune_loss: FineTuneLossOptions = field(default_factory=FineTuneLossOptions)
    dreambooth: DreamBoothOptions = field(default_factory=DreamBoothOptions)
    textual_inversion: TextualInversionOptions = field(default_factory=TextualInversionOptions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        return {k: v for group in self.to_dict().values() for k, v in group.items()}


# ---------------------------------------------------------------- parsing


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _add_argument(group: argparse._ArgumentGroup, f: dataclasses.Field, hints: dict) -> None:
    annotation = _unwrap_optional(hints[f.name])
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    names = [f"--{f.name}", *f.metadata.get("aliases", ())]
    kwargs: dict[str, Any] = {"dest": f.name, "help": f"{f.metadata['help']} (default: {default!r})"}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(annotation) is Literal:
        kwargs["choices"] = typing.get_args(annotation)
    elif typing.get_origin(annotation) is list:
        kwargs.update(nargs="*", type=typing.get_args(annotation)[0])
    else:
        kwargs["type"] = annotation
    group.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    # Not transformers.HfArgumentParser: it fills every field's default into the namespace, so
    # `defaults < --config file < flags` could not tell a typed flag from a default. With
    # argument_default=SUPPRESS only typed flags appear, and they override the file's values.
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a latent text-to-image diffusion model (or its VAE) with accelerate.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file with the same keys as the flags (flags override it).")
    for name, cls in GROUPS.items():
        group = parser.add_argument_group(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_argument(group, f, hints)
    return parser


def load_config_file(path: str | Path) -> dict:
    """Flat keys from a YAML or JSON file (grouped files, as saved in config.json, are flattened)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as error:  # UnicodeDecodeError, JSONDecodeError, yaml.YAMLError: say which file
        raise ValueError(f"--config {path} cannot be read: {error}".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of option names to values.")
    flat = {}
    for key, value in values.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def config_from_flat(values: dict) -> TrainConfig:
    """A TrainConfig from flat option names; unknown names are an error that lists the valid ones."""
    known = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown}; run `python -m training.train --help` for the valid ones.")
    grouped: dict[str, dict] = {group: {} for group in GROUPS}
    for key, value in values.items():
        grouped[known[key]][key] = value
    return TrainConfig(**{group: GROUPS[group](**kw) for group, kw in grouped.items()})


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < --config file < command-line flags."""
    args = vars(build_parser().parse_args(argv))
    file_values = load_config_file(args.pop("config")) if "config" in args else {}
    config = config_from_flat({**file_values, **args})
    f = config.finetune_data
    given_data = config.data.train_data_dir is not None or f.hf_dataset is not None or bool(f.webdataset_shards)
    if given_data and "dataset" not in {**file_values, **args}:
        config.data.dataset = "folder"
    return config


# ---------------------------------------------------------------- validation (before anything is loaded)


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: low <= v (or low < v if low_open), v < high (or <= if high_closed)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_closed: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value <= self.high if self.high_closed else value < self.high)
        return above and below

    def __str__(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
        high = "" if self.high is None else f"{'<=' if self.high_closed else '<'} {self.high}"
        return " and ".join(part for part in (low, high) if part)


POSITIVE, AT_LEAST_0, AT_LEAST_1, UNIT = Range(0, low_open=True), Range(0), Range(1), Range(0, 1)
RANGES = {
    "num_train_samples": AT_LEAST_1, "num_validation_samples": AT_LEAST_1, "resolution": Range(8),
    "proportion_empty_prompts": UNIT, "dataloader_num_workers": AT_LEAST_0, "vae_kl_weight": AT_LEAST_0,
    "lora_rank": AT_LEAST_1, "lora_alpha": POSITIVE, "num_train_timesteps": Range(2), "snr_gamma": POSITIVE,
    "snr_floor": AT_LEAST_0, "noise_offset": AT_LEAST_0, "input_perturbation": AT_LEAST_0, "logit_std": POSITIVE,
    "flow_shift": POSITIVE, "train_batch_size": AT_LEAST_1, "max_train_steps": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1, "learning_rate": POSITIVE, "lr_warmup_steps": AT_LEAST_0,
    "adam_beta1": UNIT, "adam_beta2": UNIT, "adam_weight_decay": AT_LEAST_0, "adam_epsilon": POSITIVE,
    "max_grad_norm": AT_LEAST_0, "ema_decay": Range(0, 1, high_closed=True), "seed": Range(0, 2**32),
    "checkpointing_steps": AT_LEAST_1, "checkpoints_total_limit": AT_LEAST_1, "validation_steps": AT_LEAST_1,
    "validation_inference_steps": AT_LEAST_1, "validation_guidance_scale": AT_LEAST_0, "logging_steps": AT_LEAST_1,
}


def _type_error(value: Any, annotation: Any) -> str | None:
    """Why `value` does not fit the option's type (config files are not typed by argparse), or None."""
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"
    if typing.get_origin(annotation) is list:
        item = typing.get_args(annotation)[0]
        ok = isinstance(value, list) and not any(_type_error(v, item) for v in value)
        return None if ok else f"must be a list of {getattr(item, '__name__', item)} values"
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isfinite(value) else "must be a finite number"
    wanted = {bool: "true or false", int: "an integer", str: "a string", float: "a number"}.get(annotation)
    if wanted is None:
        return None  # a type without a rule here: left to the code that uses the option
    ok = isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))
    return None if ok else f"must be {wanted}"


def check_option_values(config: TrainConfig) -> None:
    """Every option has its type and lies in its range (ValueError naming the option and the fix)."""
    for group in GROUPS:
        options, hints = getattr(config, group), typing.get_type_hints(GROUPS[group])
        for f in dataclasses.fields(options):
            value, annotation = getattr(options, f.name), hints[f.name]
            optional = _unwrap_optional(annotation) is not annotation
            if value is None and optional:
                continue
            if problem := _type_error(value, _unwrap_optional(annotation)):
                raise ValueError(f"--{f.name} {value!r} {problem}.")
            if f.name in RANGES and value not in RANGES[f.name]:
                raise ValueError(f"--{f.name} {value!r} must be {RANGES[f.name]}.")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_paths(config: TrainConfig) -> None:
    """Input paths exist and the run directory can be written (ValueError/FileNotFoundError naming the option)."""
    m, d, r = config.model, config.data, config.run
    must_exist = {"train_data_dir": d.train_data_dir, "from_scratch": m.from_scratch, "pretrained_vae": m.pretrained_vae,
                  "pretrained_model_name_or_path": m.pretrained_model_name_or_path,
                  "single_file_config": m.single_file_config,
                  "resume_from_checkpoint": None if r.resume_from_checkpoint == "latest" else r.resume_from_checkpoint}
    for name, value in must_exist.items():
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"--{name} {value} does not exist (nothing is downloaded: give a local path).")
    for name in ("train_data_dir", "from_scratch"):
        if must_exist[name] is not None and not Path(must_exist[name]).is_dir():
            raise ValueError(f"--{name} {must_exist[name]} is not a folder.")
    out = Path(r.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file; give a folder for the run.")
    if not os.access(_nearest_existing(out.absolute()), os.W_OK):
        raise PermissionError(f"--output_dir {out} cannot be written ({_nearest_existing(out.absolute())} is read-only).")
