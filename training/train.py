"""Train a latent text-to-image model (or its VAE): `accelerate launch -m training.train --help`.

From scratch (SD layout) or fine-tuning an SD 1.x/2.x or SDXL folder (the family is detected from
the folder; SDXL's conditioning is in `training.sdxl`).

Flow (as in NVlabs/edm's train.py): typed options -> one config -> printed and saved
as config.json in the run directory -> data, models, optimizer -> `train_loop` ->
a diffusers pipeline folder (or, with --train_vae, a VAE folder) in output_dir.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from training import checkpointing, data, sdxl, shapes, shards, textual_inversion
from training.buckets import BucketBatchOrder, assign_buckets, describe, per_image_batches
from training.captions import CaptionVariation
from training.config import TrainConfig, check_option_values, check_paths, parse_config
from training.dreambooth import PairedOrder, class_sources, with_instance_prompt
from training.dreambooth import check_options as check_dreambooth_options
from training.load_and_save import (
    Components,
    load_from_scratch,
    load_pretrained,
    output_scheduler,
    resolve_objective,
    save_pipeline,
    save_vae,
)
from training.loss_options import attach_masks
from training.losses import DiffusionLoss, VaeLoss, VaeReconstruction
from training.objectives import Objective, build_schedule, check_objective
from training.optimizers import build_optimizer
from training.train_loop import LoopParts, LoopSchedule, train_loop
from training.validation import VALIDATION_SEED, Validator, latent_cache, scaling_factor_of

logger = logging.getLogger("training")


@dataclass
class Dataset:
    train: list[data.ImageSource]
    validation: list[data.ImageSource]
    words: list[str]
    skipped: int = 0


# ---------------------------------------------------------------- setup


def check_config(config: TrainConfig) -> None:
    """Refuse bad or contradictory options before anything is loaded or written."""
    check_option_values(config)
    m, o, d = config.model, config.objective, config.data
    if bool(m.pretrained_model_name_or_path) == bool(m.from_scratch) and not (m.train_vae and m.pretrained_vae):
        raise ValueError("Give exactly one of --pretrained_model_name_or_path (a local SD folder or file) "
                         "and --from_scratch (a folder of small configs).")
    if m.train_vae and (m.train_text_encoder or m.lora_rank):
        raise ValueError("--train_vae trains only the AutoencoderKL; drop --train_text_encoder/--lora_rank.")
    if o.prediction_type:
        check_objective(o.prediction_type, o.zero_terminal_snr)
    if m.lora_alpha is not None and m.lora_rank is None:
        raise ValueError("--lora_alpha needs --lora_rank (LoRA is off without a rank).")
    if o.snr_floor is not None and o.snr_gamma is None:
        raise ValueError("--snr_floor bounds the Min-SNR weights: it needs --snr_gamma (e.g. --snr_gamma 5).")
    streamed = config.finetune_data.hf_dataset or config.finetune_data.webdataset_shards
    if d.dataset == "folder" and d.train_data_dir is None and not streamed:
        raise ValueError("--dataset folder needs --train_data_dir (a folder of images with captions), "
                         "--hf_dataset or --webdataset_shards.")
    if d.dataset == "shapes" and d.train_data_dir is not None:
        raise ValueError("--train_data_dir is an image folder: drop --dataset shapes (or the folder).")
    for name in ("shapes_colors", "shapes_backgrounds"):
        if unknown := sorted(set(getattr(d, name) or ()) - set(shapes.COLORS)):
            raise ValueError(f"--{name} {unknown} unknown; valid colours: {', '.join(shapes.COLORS)}.")
    check_finetune_options(config)
    check_dreambooth_options(config)


def check_finetune_options(config: TrainConfig) -> None:
    """The issue-20 options (buckets, adapters, optimizers) against each other and the rest."""
    m, f = config.model, config.finetune_model
    if config.finetune_data.enable_bucket and m.train_vae:
        raise ValueError("--enable_bucket trains the diffusion model; --train_vae trains on square crops: drop one.")
    loss = config.finetune_loss
    if loss.masked_loss and (not loss.conditioning_data_dir or not config.data.train_data_dir or
                             config.data.cache_latents or m.train_vae):
        raise ValueError("--masked_loss needs an image folder (--train_data_dir), its masks in "
                         "--conditioning_data_dir, and pixels (not --cache_latents or --train_vae).")
    if config.finetune_data.webdataset_shards and (config.data.cache_latents or loss.masked_loss or m.train_vae or
                                                   config.dreambooth.with_prior_preservation or
                                                   config.data.dataloader_num_workers):
        raise ValueError("--webdataset_shards streams pixels in the main process: drop --cache_latents, "
                         "--masked_loss, --train_vae, --with_prior_preservation and --dataloader_num_workers.")
    ti = config.textual_inversion
    if ti.placeholder_token and (not ti.initializer_token or m.lora_rank or m.train_text_encoder or m.train_vae
                                 or ti.num_vectors < 1):
        raise ValueError("--placeholder_token (textual inversion) needs --initializer_token and --num_vectors >= 1, "
                         "and trains only the new embedding: drop --lora_rank/--train_text_encoder/--train_vae.")
    if loss.multires_noise_iterations < 0 or not 0 < loss.multires_noise_discount <= 1:
        raise ValueError("--multires_noise_iterations must be >= 0 and --multires_noise_discount in (0, 1].")
    if f.lora_type != "lora" and f.lora_format != "peft":
        raise ValueError(f"--lora_type {f.lora_type} adapters have no diffusers or kohya LoRA file format: add "
                         "--lora_format peft (adapter folders that peft loads).")
    if f.use_dora and f.lora_format in ("kohya", "both"):
        raise ValueError("--use_dora: diffusers' kohya converter does not write DoRA magnitudes; use --lora_format "
                         "diffusers (loaded by `pipe.load_lora_weights`) or peft.")
    if f.use_dora and m.train_text_encoder:
        raise ValueError("--use_dora with --train_text_encoder: stock `load_lora_weights` (transformers 5) drops a "
                         "text encoder's DoRA magnitudes, so the file would not reproduce training; train DoRA on "
                         "the UNet only (drop --train_text_encoder) or use plain LoRA.")
    if f.use_dora and f.lora_type != "lora":
        raise ValueError(f"--use_dora applies to --lora_type lora only, not {f.lora_type}.")
    if f.text_encoder_lr is not None and not m.train_text_encoder:
        raise ValueError("--text_encoder_lr needs --train_text_encoder (the text encoder is frozen otherwise).")


def make_accelerator(config: TrainConfig) -> Accelerator:
    run = config.run
    project = ProjectConfiguration(project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "logs"))
    # Launched as several processes on a machine without CUDA: DDP over gloo on the CPU (accelerate
    # otherwise treats each process as a separate single-process run).
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=config.optimization.mixed_precision, cpu=cpu_ddp,
        log_with=None if run.report_to == "none" else run.report_to, project_config=project,
    )
    if accelerator.num_processes > 1:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
        if accelerator.is_main_process:
            logger.info("Training distributed (%s) over %d processes on %s.", backend, accelerator.num_processes,
                        accelerator.device)
    return accelerator


def load_dataset(config: TrainConfig) -> Dataset:
    d, seed = config.data, config.optimization.seed
    if d.dataset == "shapes":
        return Dataset(
            data.shapes_sources(seed, d.num_train_samples, d.shapes_colors, d.shapes_backgrounds),
            data.shapes_validation_sources(d.num_validation_samples),
            data.shapes_vocabulary(),
        )
    if config.finetune_data.webdataset_shards:
        return shard_dataset(config)
    if config.finetune_data.hf_dataset:
        from training.hf_data import hf_sources

        sources, skipped = hf_sources(config.finetune_data.hf_dataset, d.image_column, d.caption_column), 0
    else:
        sources, skipped = data.folder_sources(d.train_data_dir, d.image_column, d.caption_column)
    if config.finetune_loss.masked_loss:
        sources = attach_masks(sources, config.finetune_loss.conditioning_data_dir)
    sources = with_instance_prompt(sources, config.dreambooth.instance_prompt)
    held = d.num_validation_samples if len(sources) >= 2 * d.num_validation_samples else 0
    if not held:
        logger.warning("Only %d images: the validation loss uses training images.", len(sources))
    train, validation = (sources[:-held], sources[-held:]) if held else (sources, sources[: d.num_validation_samples])
    captions = [s.caption for s in sources] + [config.dreambooth.class_prompt or ""]
    return Dataset(train, validation, data.caption_vocabulary(captions), skipped)


def shard_dataset(config: TrainConfig) -> Dataset:
    """Streamed shards: no training list (batches come from `training.shards`), the first samples validate."""
    paths = shards.shard_paths(config.finetune_data.webdataset_shards)
    validation = shards.first_samples(paths, config.data.num_validation_samples)
    captions = shards.all_captions(paths) if config.model.from_scratch else [s.caption for s in validation]
    logger.warning("Streaming %d shards: the validation loss uses their first %d samples.", len(paths), len(validation))
    return Dataset([], validation, data.caption_vocabulary(captions))


def load_components(config: TrainConfig, words: list[str]) -> Components:
    m = config.model
    if m.from_scratch and not m.train_vae and not m.train_text_encoder:
        logger.warning("--from_scratch without --train_text_encoder: the text encoder stays at its random init.")
    if m.from_scratch:
        with tempfile.TemporaryDirectory() as work:  # the tokenizer files; nothing lands in output_dir before training
            return load_from_scratch(m, words, config.data.resolution, Path(work), config.optimization.seed)
    if m.train_vae and not m.pretrained_model_name_or_path:
        from training.load_and_save import load_vae

        return Components(None, load_vae(m.pretrained_vae, m.allow_pickle), None, None, {})
    components = load_pretrained(m)
    if components.family == "sdxl":
        sdxl.check_options(config)
    return components


def make_optimizer(config: TrainConfig, groups: list[dict]):
    """The --optimizer over parameter groups, and the learning-rate schedule."""
    o, f = config.optimization, config.finetune_model
    optimizer = build_optimizer(f.optimizer, groups, o, f.optimizer_args)
    lr_scheduler = get_scheduler(
        o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps, num_training_steps=o.max_train_steps
    )
    return optimizer, lr_scheduler


def make_ema(config: TrainConfig, params: list[torch.nn.Parameter]):
    if not config.optimization.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=config.optimization.ema_decay)


def trainable_parameters(models: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for model in models for p in model.parameters() if p.requires_grad]


def parameter_groups(config: TrainConfig, trained: list[torch.nn.Module]) -> list[dict]:
    """The UNet (or VAE) at --learning_rate; a trained text encoder at --text_encoder_lr when given.

    Textual inversion trains an embedding table without weight decay (the old rows must not decay).
    """
    if config.textual_inversion.placeholder_token:
        return [{"params": trainable_parameters(trained), "weight_decay": 0.0}]
    groups = [{"params": trainable_parameters(trained[:1])}]
    if len(trained) > 1:
        lr = config.finetune_model.text_encoder_lr
        groups.append({"params": trainable_parameters(trained[1:]), **({"lr": lr} if lr is not None else {})})
    return groups


def resume(state: checkpointing.TrainingState, config: TrainConfig) -> int:
    """Load the checkpoint to resume from (if any) and return its step."""
    found = checkpointing.resolve_checkpoint(config.run.output_dir, config.run.resume_from_checkpoint,
                                             config.model.allow_pickle)
    step = 0
    if found is None and config.run.resume_from_checkpoint:
        logger.info("No checkpoint in %s yet: starting from step 0.", config.run.output_dir)
    if found is not None:
        step = checkpointing.read_state(found)["step"]
        if step >= config.optimization.max_train_steps:
            raise ValueError(f"--max_train_steps {config.optimization.max_train_steps} is not above the step of "
                             f"{found} ({step}); raise it to train further.")
        step = checkpointing.load_checkpoint(state, found)
        logger.info("Resumed from %s (step %d).", found, step)
    return step


def open_run_directory(config: TrainConfig, accelerator: Accelerator, dataset: Dataset) -> None:
    """output_dir, its config.json and trackers: written only once every input was accepted (and resumed)."""
    run = config.run
    if accelerator.is_main_process:
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(run.output_dir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if run.report_to != "none":
        scalars = {k: v for k, v in config.flat().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train", config=scalars)
    accelerator.log({"data/train_samples": len(dataset.train), "data/skipped_images": dataset.skipped}, step=0)
    accelerator.wait_for_everyone()


def loop_schedule(config: TrainConfig, start_step: int) -> LoopSchedule:
    o, r = config.optimization, config.run
    return LoopSchedule(
        start_step=start_step, max_train_steps=1 if r.test_run else o.max_train_steps,
        gradient_accumulation_steps=o.gradient_accumulation_steps, max_grad_norm=o.max_grad_norm, seed=o.seed,
        logging_steps=r.logging_steps, checkpointing_steps=r.checkpointing_steps, validation_steps=r.validation_steps,
    )


def batch_order(config: TrainConfig, accelerator: Accelerator, sources: list[data.ImageSource], buckets=None):
    """Square batches (data.BatchOrder) or, with bucketing, one-bucket batches (buckets.BucketBatchOrder)."""
    o = config.optimization
    repeats = tuple(s.repeats for s in sources)
    if buckets is not None:
        return BucketBatchOrder(buckets, repeats, o.train_batch_size, o.seed, accelerator.process_index,
                                accelerator.num_processes)
    return data.BatchOrder(len(sources), o.train_batch_size, o.seed, accelerator.process_index,
                           accelerator.num_processes, repeats if set(repeats) != {1} else None)


def image_dataset(config: TrainConfig, sources: list[data.ImageSource], sizes=None) -> data.ImageDataset:
    d = config.data
    transform = data.ImageTransform(d.resolution, d.center_crop, d.random_flip)
    return data.ImageDataset(sources, transform, config.optimization.seed, sizes)


def training_buckets(config: TrainConfig, accelerator: Accelerator, components: Components, sources) -> tuple:
    """(bucket size of each image, bucket of each image) with --enable_bucket (table logged), else (None, None)."""
    if not config.finetune_data.enable_bucket:
        return None, None
    factor = components.vae_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)
    table, buckets = assign_buckets(config.finetune_data, config.data.resolution, factor, [s.size() for s in sources])
    if accelerator.is_main_process:
        logger.info("Aspect-ratio buckets:\n%s", describe(table, buckets, [s.repeats for s in sources]))
    return [table[b] for b in buckets], buckets


def caption_variation(config: TrainConfig, components: Components, sources) -> CaptionVariation:
    f = config.finetune_data
    return CaptionVariation([s.caption for s in sources], components.tokenizers, config.optimization.seed,
                            f.keep_tokens, f.shuffle_caption, f.caption_tag_dropout_rate)


def caption_ids(components: Components, captions: list[str]) -> torch.Tensor:
    """Token ids of captions for the model's tokenizer(s): (N, L), or (N, 2, L) for SDXL."""
    return data.tokenize(components.tokenizers, captions)


def text_encoder_of(components: Components, swap: dict | None = None):
    """What the loss calls on caption ids: SD's text encoder, or SDXL's pair (DDP-wrapped modules from `swap`)."""
    encoders = [(swap or {}).get(id(e), e) for e in components.text_encoders]
    return sdxl.SDXLTextEncoders(*encoders) if components.family == "sdxl" else encoders[0]


def caption_inputs(config: TrainConfig, accelerator: Accelerator, components: Components, swap: dict, sources):
    """(text encoder(s), ids of every caption by dataset index, ids of the empty caption) for the training loss.

    SDXL with frozen text encoders, --cache_latents and fixed captions: the embeddings are cached once
    (`sdxl.text_embedding_cache`) and the "ids" are rows of that table.
    """
    f = config.finetune_data
    fixed_captions = not (f.shuffle_caption or f.caption_tag_dropout_rate > 0)
    frozen = not config.model.train_text_encoder
    captions = [s.caption for s in sources]
    if components.family == "sdxl" and config.data.cache_latents and frozen and fixed_captions:
        return sdxl.text_embedding_cache(accelerator, components, captions, Path(config.run.output_dir) / "cache")
    ids = caption_ids(components, captions) if sources else None
    return text_encoder_of(components, swap), ids, caption_ids(components, [""])[0]


def validate_fn(validator: Validator, optimizer):
    """Validation at a schedule-free optimizer's averaged weights (train mode again afterwards)."""

    def validate(step: int) -> dict:
        optimizer.eval()
        try:
            return validator.validate(step)
        finally:
            optimizer.train()

    return validate


def checkpoint_fn(state: checkpointing.TrainingState, config: TrainConfig):
    return lambda step: checkpointing.save_checkpoint(state, config.run.output_dir, step, config.run.checkpoints_total_limit)


# ---------------------------------------------------------------- the two kinds of run


def build_objective(config: TrainConfig, components: Components) -> tuple[Objective, dict]:
    scheduler_keys = resolve_objective(config.objective, components.scheduler_config)
    check_objective(scheduler_keys["prediction_type"], scheduler_keys["rescale_betas_zero_snr"])
    o = config.objective
    schedule = build_schedule(
        scheduler_keys["prediction_type"], scheduler_keys["beta_schedule"], scheduler_keys["num_train_timesteps"],
        scheduler_keys["beta_start"], scheduler_keys["beta_end"], scheduler_keys["rescale_betas_zero_snr"], o.flow_shift,
    )
    objective = Objective(
        schedule, scheduler_keys["prediction_type"], o.snr_gamma, o.snr_floor, o.timestep_sampling, o.logit_mean,
        o.logit_std, o.flow_shift, o.noise_offset, o.input_perturbation, config.finetune_loss.debiased_estimation_loss,
        config.finetune_loss.multires_noise_iterations, config.finetune_loss.multires_noise_discount,
    )
    if o.snr_gamma is not None and o.snr_floor is None and bool(schedule.snr.min() == 0):
        logger.warning("Min-SNR weights are 0 at the zero-SNR step, which then is never trained; consider "
                       "--snr_floor 1 (see training/objectives.py).")
    return objective, scheduler_keys


def prepare_diffusion_models(config: TrainConfig, components: Components, new_token_ids=None) -> list[torch.nn.Module]:
    """Freeze what is not trained; returns the modules with trainable parameters."""
    m, f = config.model, config.finetune_model
    components.vae.requires_grad_(False).eval()
    if new_token_ids:  # textual inversion: only the new rows of the text encoder's embedding table
        from training.textual_inversion import train_only_rows

        components.unet.requires_grad_(False)
        train_only_rows(components.text_encoder, new_token_ids)
        return [components.text_encoder]
    text_encoders = components.text_encoders  # SDXL: both
    for te in text_encoders:
        te.requires_grad_(m.train_text_encoder).train(m.train_text_encoder)
    if m.lora_rank:
        from training.lora import add_text_encoder_lora, add_unet_lora

        add_unet_lora(components.unet, m.lora_rank, m.lora_alpha, f.lora_type, f.use_dora)
        for te in text_encoders if m.train_text_encoder else []:
            add_text_encoder_lora(te, m.lora_rank, m.lora_alpha, f.lora_type, f.use_dora)
    if m.train_text_encoder and components.family == "sdxl":
        sdxl.freeze_unused_layers(components.text_encoder)
    if config.optimization.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        for te in text_encoders if m.train_text_encoder else []:  # transformers 5 renamed gradient_checkpointing_enable
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    return [components.unet] + (text_encoders if m.train_text_encoder else [])


def diffusion_batches(config, accelerator, components, train, prior, start_micro):
    """Micro-batches from `start_micro` on: streamed from shards, or from the image list (`listed_batches`)."""
    if config.finetune_data.webdataset_shards:
        batches = shard_batches(config, accelerator, components).skip(start_micro)
    else:
        batches = listed_batches(config, accelerator, components, train, prior, start_micro)
    if config.finetune_data.record_data_order:
        path = Path(config.run.output_dir) / f"data_order-rank{accelerator.process_index}.jsonl"
        return data.recorded(batches, path)
    return batches


def listed_batches(config, accelerator, components, train, prior, start_micro):
    """Micro-batches of cached latents or of pixels (with class images: paired)."""
    sizes, buckets = training_buckets(config, accelerator, components, train)
    order = batch_order(config, accelerator, train, buckets)
    if prior:
        order = PairedOrder(order, batch_order(config, accelerator, prior), len(train))
    if config.data.cache_latents:
        name = f"train-{prior[0].path.parent.name}" if prior else "train"
        cached = latent_cache(accelerator, components.vae, image_dataset(config, train + prior, sizes), config, name)
        return (per_image_batches if sizes else data.tensor_batches)(cached, order, start_micro)
    return data.image_batches(image_dataset(config, train + prior, sizes), order, start_micro,
                              config.data.dataloader_num_workers)


def shard_batches(config: TrainConfig, accelerator: Accelerator, components: Components) -> shards.ShardBatches:
    d, f = config.data, config.finetune_data
    table = None
    if f.enable_bucket:
        factor = components.vae_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)
        table, _ = assign_buckets(f, d.resolution, factor, [])
    return shards.ShardBatches(
        shards.shard_paths(f.webdataset_shards), data.ImageTransform(d.resolution, d.center_crop, d.random_flip),
        caption_variation(config, components, []), config.optimization.train_batch_size, config.optimization.seed,
        accelerator.process_index, accelerator.num_processes, table,
    )


def train_diffusion(config: TrainConfig, accelerator: Accelerator, components: Components, dataset: Dataset) -> Path:
    objective, scheduler_keys = build_objective(config, components)
    data.check_resolution(config.data.resolution, components.vae_factor)
    db = config.dreambooth
    prior = class_sources(config, accelerator, components, scheduler_keys) if db.with_prior_preservation else []
    ti = config.textual_inversion
    new_ids = textual_inversion.setup(ti, components.tokenizer, components.text_encoder, dataset) if ti.placeholder_token else None
    trained = prepare_diffusion_models(config, components, new_ids)
    params = trainable_parameters(trained)
    optimizer, lr_scheduler = make_optimizer(config, parameter_groups(config, trained))
    ema = make_ema(config, params)
    *prepared, optimizer = accelerator.prepare(*trained, optimizer)
    optimizer.train()  # schedule-free optimizers step in train mode (a no-op for the others)
    state = checkpointing.TrainingState(accelerator, prepared, optimizer, lr_scheduler, ema)
    start = resume(state, config)
    open_run_directory(config, accelerator, dataset)
    shared = dict(vae=components.vae, objective=objective, caption_dropout=config.data.proportion_empty_prompts,
                  scaling_factor=components.vae.config.scaling_factor)
    swap = {id(module): wrapped for module, wrapped in zip(trained, prepared)}  # the DDP-wrapped trained modules
    text, input_ids, empty_ids = caption_inputs(config, accelerator, components, swap, dataset.train + prior)
    loss_fn = DiffusionLoss(swap.get(id(components.unet), components.unet), text, input_ids=input_ids,
                            empty_ids=empty_ids, variation=caption_variation(config, components, dataset.train + prior),
                            num_instance=len(dataset.train) if prior else None, prior_loss_weight=db.prior_loss_weight,
                            **shared)
    validation_ids = caption_ids(components, [s.caption for s in dataset.validation])
    validator = Validator(accelerator, config, components, scheduler_keys, ema, params,
                          DiffusionLoss(components.unet, text_encoder_of(components), input_ids=validation_ids,
                                        empty_ids=caption_ids(components, [""])[0], **shared),
                          dataset.validation)
    parts = LoopParts(
        accelerator, loss_fn, prepared, params, optimizer, lr_scheduler,
        diffusion_batches(config, accelerator, components, dataset.train, prior,
                          start * config.optimization.gradient_accumulation_steps),
        ema, validate_fn(validator, optimizer), checkpoint_fn(state, config), accelerator.log,
    )
    history = train_loop(parts, loop_schedule(config, start))
    optimizer.eval()  # a schedule-free optimizer's averaged weights are the trained model
    finish(config, accelerator, validator, ema, params,
           lambda: save_diffusion_output(config, components, scheduler_keys, new_ids), history)
    return output_path(config)


def check_replicas_agree(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """DDP keeps every process's weights identical; refuse to save if they drifted apart."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([sum(p.detach().double().sum() for p in params), sum(p.detach().double().abs().sum() for p in params)])
    sums = accelerator.gather(checksum.to(accelerator.device)[None]).cpu()
    if not torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-9, atol=0):
        raise RuntimeError(f"Processes hold different weights after training (checksums {sums.tolist()}); "
                           "gradients were not synchronised.")
    logger.info("All %d processes hold identical weights.", accelerator.num_processes)


def finish(config: TrainConfig, accelerator: Accelerator, validator: Validator, ema, params, save, history) -> None:
    """On the main process: EMA weights in, save the output, write train_summary.json (all ranks wait)."""
    check_replicas_agree(accelerator, params)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(params)
        save()
        final_loss = validator.eval_loss.fixed_loss(validator.batch(), VALIDATION_SEED)
        write_summary(Path(config.run.output_dir), history, final_loss)
    accelerator.wait_for_everyone()


def output_path(config: TrainConfig) -> Path:
    """What a diffusion run writes: textual_inversion/, lora/ or model/ in output_dir."""
    kind = "textual_inversion" if config.textual_inversion.placeholder_token else "lora" if config.model.lora_rank else "model"
    return Path(config.run.output_dir) / kind


def save_diffusion_output(config: TrainConfig, components: Components, scheduler_keys: dict, new_ids=None) -> Path:
    out = Path(config.run.output_dir)
    if new_ids:
        return textual_inversion.save_embeddings(output_path(config), components.text_encoder,
                                                 config.textual_inversion.placeholder_token, new_ids)
    if config.model.lora_rank:
        from training.lora_export import save_adapters

        names = ("text_encoder", "text_encoder_2")
        text_encoders = dict(zip(names, components.text_encoders)) if config.model.train_text_encoder else {}
        return save_adapters(out / "lora", components.unet, lora_format=config.finetune_model.lora_format, **text_encoders)
    return save_pipeline(out / "model", components, output_scheduler(scheduler_keys))


def train_vae(config: TrainConfig, accelerator: Accelerator, components: Components, dataset: Dataset) -> Path:
    vae = components.vae
    data.check_resolution(config.data.resolution, components.vae_factor)
    wrapper = VaeReconstruction(vae.train())
    params = trainable_parameters([wrapper])
    optimizer, lr_scheduler = make_optimizer(config, [{"params": params}])
    ema = make_ema(config, params)
    prepared, optimizer = accelerator.prepare(wrapper, optimizer)
    optimizer.train()
    state = checkpointing.TrainingState(accelerator, [prepared], optimizer, lr_scheduler, ema)
    start = resume(state, config)
    open_run_directory(config, accelerator, dataset)
    latent = config.data.resolution // components.vae_factor
    latent_shape = (vae.config.latent_channels, latent, latent)
    validator = Validator(accelerator, config, components, {}, ema, params, VaeLoss(wrapper, config.model.vae_kl_weight, latent_shape),
                          dataset.validation)
    order = batch_order(config, accelerator, dataset.train)
    batches = data.image_batches(image_dataset(config, dataset.train), order,
                                 start * config.optimization.gradient_accumulation_steps, config.data.dataloader_num_workers)
    parts = LoopParts(accelerator, VaeLoss(prepared, config.model.vae_kl_weight, latent_shape), [prepared], params,
                      optimizer, lr_scheduler, batches, ema, validate_fn(validator, optimizer), checkpoint_fn(state, config),
                      accelerator.log)
    history = train_loop(parts, loop_schedule(config, start))
    optimizer.eval()

    def save():
        vae.eval().register_to_config(scaling_factor=scaling_factor_of(vae, image_dataset(config, dataset.train)))
        save_vae(Path(config.run.output_dir) / "vae", vae)

    finish(config, accelerator, validator, ema, params, save, history)
    return Path(config.run.output_dir) / "vae"


def write_summary(out: Path, history: list[tuple[int, float]], final_validation_loss: float) -> None:
    """Losses of this run (this process's segment when resumed) and the validation loss of the saved weights."""
    losses = [loss for _, loss in history]
    summary = {"steps": history[-1][0] if history else None, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "final_validation_loss": final_validation_loss,
               "loss_history": history}
    (out / "train_summary.json").write_text(json.dumps(summary))


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> Path | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_config(argv)
    check_config(config)
    print(json.dumps(config.to_dict(), indent=2))
    if config.run.dry_run:
        return None
    check_paths(config)  # not in a dry run: a recipe stage's inputs are made by the stages before it
    dataset = load_dataset(config)
    accelerator = make_accelerator(config)
    set_seed(config.optimization.seed)
    components = load_components(config, dataset.words)
    run = train_vae if config.model.train_vae else train_diffusion
    result = run(config, accelerator, components, dataset)
    accelerator.end_training()
    if accelerator.is_main_process:
        logger.info("Wrote %s", result)
    return result


USER_ERRORS = (ValueError, OSError, FloatingPointError)  # bad options, files or data; a diverging loss


def cli(argv: list[str] | None = None) -> None:
    """Console entry point (`ldm-train`): a user error is one line on stderr and exit code 2, Ctrl-C exits 130."""
    try:
        main(argv)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
