"""Train a latent text-to-image model (or its VAE): `accelerate launch -m training.train --help`.

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

from training import checkpointing, data, shapes
from training.config import TrainConfig, check_option_values, check_paths, parse_config
from training.load_and_save import (
    Components, load_from_scratch, load_pretrained, output_scheduler, resolve_objective, save_pipeline, save_vae,
)
from training.losses import DiffusionLoss, VaeLoss, VaeReconstruction
from training.objectives import Objective, build_schedule, check_objective
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
    if d.dataset == "folder" and d.train_data_dir is None:
        raise ValueError("--dataset folder needs --train_data_dir (a folder of images with captions).")
    if d.dataset == "shapes" and d.train_data_dir is not None:
        raise ValueError("--train_data_dir is an image folder: drop --dataset shapes (or the folder).")
    for name in ("shapes_colors", "shapes_backgrounds"):
        if unknown := sorted(set(getattr(d, name) or ()) - set(shapes.COLORS)):
            raise ValueError(f"--{name} {unknown} unknown; valid colours: {', '.join(shapes.COLORS)}.")


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
    sources, skipped = data.folder_sources(d.train_data_dir, d.image_column, d.caption_column)
    held = d.num_validation_samples if len(sources) >= 2 * d.num_validation_samples else 0
    if not held:
        logger.warning("Only %d images: the validation loss uses training images.", len(sources))
    train, validation = (sources[:-held], sources[-held:]) if held else (sources, sources[: d.num_validation_samples])
    return Dataset(train, validation, data.caption_vocabulary([s.caption for s in sources]), skipped)


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
    return load_pretrained(m)


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]):
    o = config.optimization
    optimizer = torch.optim.AdamW(
        params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay,
        eps=o.adam_epsilon,
    )
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


def batch_order(config: TrainConfig, accelerator: Accelerator, num_samples: int) -> data.BatchOrder:
    return data.BatchOrder(
        num_samples, config.optimization.train_batch_size, config.optimization.seed,
        accelerator.process_index, accelerator.num_processes,
    )


def image_dataset(config: TrainConfig, sources: list[data.ImageSource]) -> data.ImageDataset:
    d = config.data
    transform = data.ImageTransform(d.resolution, d.center_crop, d.random_flip)
    return data.ImageDataset(sources, transform, config.optimization.seed)


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
        o.logit_std, o.flow_shift, o.noise_offset, o.input_perturbation,
    )
    if o.snr_gamma is not None and o.snr_floor is None and bool(schedule.snr.min() == 0):
        logger.warning("Min-SNR weights are 0 at the zero-SNR step, which then is never trained; consider "
                       "--snr_floor 1 (see training/objectives.py).")
    return objective, scheduler_keys


def prepare_diffusion_models(config: TrainConfig, components: Components) -> list[torch.nn.Module]:
    """Freeze what is not trained; returns the modules with trainable parameters."""
    components.vae.requires_grad_(False).eval()
    components.text_encoder.requires_grad_(config.model.train_text_encoder).train(config.model.train_text_encoder)
    if config.model.lora_rank:
        from training.lora import add_unet_lora

        add_unet_lora(components.unet, config.model.lora_rank, config.model.lora_alpha)
    if config.optimization.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if config.model.train_text_encoder:
            te = components.text_encoder  # transformers 5 renamed gradient_checkpointing_enable
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    return [components.unet] + ([components.text_encoder] if config.model.train_text_encoder else [])


def diffusion_batches(config, accelerator, components, dataset, start_micro):
    """Micro-batches of cached latents or of pixels, from `start_micro` on."""
    order = batch_order(config, accelerator, len(dataset.train))
    if config.data.cache_latents:
        cached = latent_cache(accelerator, components.vae, image_dataset(config, dataset.train), config, "train")
        return data.tensor_batches(cached, order, start_micro)
    return data.image_batches(image_dataset(config, dataset.train), order, start_micro, config.data.dataloader_num_workers)


def train_diffusion(config: TrainConfig, accelerator: Accelerator, components: Components, dataset: Dataset) -> Path:
    objective, scheduler_keys = build_objective(config, components)
    data.check_resolution(config.data.resolution, components.vae_factor)
    trained = prepare_diffusion_models(config, components)
    params = trainable_parameters(trained)
    optimizer, lr_scheduler = make_optimizer(config, params)
    ema = make_ema(config, params)
    *prepared, optimizer = accelerator.prepare(*trained, optimizer)
    state = checkpointing.TrainingState(accelerator, prepared, optimizer, lr_scheduler, ema)
    start = resume(state, config)
    open_run_directory(config, accelerator, dataset)
    tokenize = lambda sources: data.tokenize(components.tokenizer, [s.caption for s in sources])
    shared = dict(vae=components.vae, objective=objective, empty_ids=data.tokenize(components.tokenizer, [""])[0],
                  caption_dropout=config.data.proportion_empty_prompts, scaling_factor=components.vae.config.scaling_factor)
    text_encoder = prepared[1] if config.model.train_text_encoder else components.text_encoder
    loss_fn = DiffusionLoss(prepared[0], text_encoder, input_ids=tokenize(dataset.train), **shared)
    validator = Validator(accelerator, config, components, scheduler_keys, ema, params,
                          DiffusionLoss(components.unet, components.text_encoder, input_ids=tokenize(dataset.validation), **shared),
                          dataset.validation)
    parts = LoopParts(
        accelerator, loss_fn, prepared, params, optimizer, lr_scheduler,
        diffusion_batches(config, accelerator, components, dataset, start * config.optimization.gradient_accumulation_steps),
        ema, validator.validate, checkpoint_fn(state, config), accelerator.log,
    )
    history = train_loop(parts, loop_schedule(config, start))
    finish(config, accelerator, validator, ema, params, lambda: save_diffusion_output(config, components, scheduler_keys), history)
    return Path(config.run.output_dir) / ("lora" if config.model.lora_rank else "model")


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


def save_diffusion_output(config: TrainConfig, components: Components, scheduler_keys: dict) -> Path:
    out = Path(config.run.output_dir)
    if config.model.lora_rank:
        from training.lora import save_lora

        return save_lora(out / "lora", components.unet)
    return save_pipeline(out / "model", components, output_scheduler(scheduler_keys))


def train_vae(config: TrainConfig, accelerator: Accelerator, components: Components, dataset: Dataset) -> Path:
    vae = components.vae
    data.check_resolution(config.data.resolution, components.vae_factor)
    wrapper = VaeReconstruction(vae.train())
    params = trainable_parameters([wrapper])
    optimizer, lr_scheduler = make_optimizer(config, params)
    ema = make_ema(config, params)
    prepared, optimizer = accelerator.prepare(wrapper, optimizer)
    state = checkpointing.TrainingState(accelerator, [prepared], optimizer, lr_scheduler, ema)
    start = resume(state, config)
    open_run_directory(config, accelerator, dataset)
    latent = config.data.resolution // components.vae_factor
    latent_shape = (vae.config.latent_channels, latent, latent)
    validator = Validator(accelerator, config, components, {}, ema, params, VaeLoss(wrapper, config.model.vae_kl_weight, latent_shape),
                          dataset.validation)
    order = batch_order(config, accelerator, len(dataset.train))
    batches = data.image_batches(image_dataset(config, dataset.train), order,
                                 start * config.optimization.gradient_accumulation_steps, config.data.dataloader_num_workers)
    parts = LoopParts(accelerator, VaeLoss(prepared, config.model.vae_kl_weight, latent_shape), [prepared], params,
                      optimizer, lr_scheduler, batches, ema, validator.validate, checkpoint_fn(state, config), accelerator.log)
    history = train_loop(parts, loop_schedule(config, start))

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
