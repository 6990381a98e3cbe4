"""Training throughput: the full training step vs a bare forward/backward/optimizer loop.

Full step = `training.train_loop.accumulate` + `optimizer_step` exactly as training
runs them: a micro-batch from the data pipeline (cached latents, or pixels encoded
by the frozen VAE), caption dropout, noise levels and noise from the per-step
generator, Min-SNR weights, text encoder + UNet forward, backward, gradient
clipping, AdamW, LR schedule and EMA. Bare loop = the same UNet and text encoder
on one fixed, precomputed batch: forward, MSE, backward, AdamW step, nothing else
(the limit). Rounds interleave the variants after a warm-up; the table reports
median samples/s and the ratio of bare to full time per sample.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --configs training/configs/small --batch_size 64
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from training import data
from training.load_and_save import scratch_text_encoder, scratch_tokenizer, scratch_unet
from training.losses import DiffusionLoss
from training.objectives import Objective, build_schedule
from training.train_loop import LoopParts, LoopSchedule, accumulate, optimizer_step


def build_models(configs: Path, latent_size: int, seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = scratch_tokenizer(data.shapes_vocabulary(), Path(tempfile.mkdtemp()),
                                  json.loads((configs / "text_encoder.json").read_text()).get("max_position_embeddings", 77))
    text_encoder = scratch_text_encoder(json.loads((configs / "text_encoder.json").read_text()), tokenizer)
    unet = scratch_unet(json.loads((configs / "unet.json").read_text()), text_encoder.config.hidden_size, latent_size, 4)
    return tokenizer, text_encoder, unet


class WaitTimer:
    """Wraps a batch iterator and adds up the time the step spends waiting in `next()` (data loading)."""

    def __init__(self, batches):
        self.batches, self.seconds, self.count = batches, 0.0, 0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.batches)
        self.seconds += time.perf_counter() - start
        self.count += 1
        return batch


def full_step_runner(args, tokenizer, text_encoder, unet, vae=None, bucketed=False):
    """A closure running one full training step (as train.py wires it) on the training pool."""
    accelerator = Accelerator(cpu=True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=10, num_training_steps=10**6)
    ema = EMAModel(params, decay=0.9999)
    unet_p, te_p, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    sources = tag_sources(args) if bucketed else data.shapes_sources(0, args.num_samples)
    objective = Objective(build_schedule("v_prediction", "scaled_linear", 1000), "v_prediction", snr_gamma=5.0)
    ids = data.tokenize(tokenizer, [s.caption for s in sources])
    if bucketed:
        batches, variation = bucketed_batches(args, sources, tokenizer)
    else:
        batches, variation = unbucketed_batches(args, sources, vae), None
    timer = WaitTimer(batches)
    loss_fn = DiffusionLoss(unet_p, te_p, vae, objective, ids, data.tokenize(tokenizer, [""])[0], 0.1, 1.0, variation)
    parts = LoopParts(accelerator, loss_fn, [unet_p, te_p], params, optimizer, lr_scheduler, timer, ema)
    schedule = LoopSchedule(start_step=0, max_train_steps=10**6)
    state = {"step": 0}

    def run() -> None:
        accumulate(parts, schedule, state["step"])
        optimizer_step(parts, 1.0)
        state["step"] += 1

    run.timer = timer
    return run


def unbucketed_batches(args, sources, vae):
    order = data.BatchOrder(len(sources), args.batch_size, 0)
    if vae is None:
        size = args.latent_size
        moments = {"latent_mean": torch.randn(len(sources), 4, size, size), "latent_std": torch.full((len(sources), 4, size, size), 0.05)}
        return data.tensor_batches(moments, order, 0)
    dataset = data.ImageDataset(sources, data.ImageTransform(args.latent_size * 4), 0)
    return data.image_batches(dataset, order, 0, num_workers=args.num_workers)


# ---------------------------------------------------------------- bucketing + caption processing

ASPECTS = [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3), (4, 3)]


def tag_sources(args) -> list[data.ImageSource]:
    """Shapes images resized to mixed aspect ratios, captions as comma-separated tags."""
    sources = []
    for i, source in enumerate(data.shapes_sources(0, args.num_samples)):
        w, h = ASPECTS[i % len(ASPECTS)]
        side = args.latent_size * 4
        image = source.image.resize((side * w // max(w, h) * 3 // 2, side * h // max(w, h) * 3 // 2))
        sources.append(data.ImageSource(", ".join(source.caption.split()), image=image))
    return sources


def bucketed_batches(args, sources, tokenizer):
    """The training data path with --enable_bucket, --shuffle_caption --keep_tokens 1 --caption_tag_dropout_rate 0.1."""
    from training.buckets import BucketBatchOrder, assign_buckets
    from training.captions import CaptionVariation
    from training.config import FineTuneDataOptions

    options = FineTuneDataOptions(enable_bucket=True, bucket_reso_steps=16)
    table, buckets = assign_buckets(options, args.latent_size * 4, 16, [s.size() for s in sources])
    dataset = data.ImageDataset(sources, data.ImageTransform(args.latent_size * 4, random_flip=True), 0,
                                [table[b] for b in buckets])
    order = BucketBatchOrder(buckets, [1] * len(sources), args.batch_size, 0)
    variation = CaptionVariation([s.caption for s in sources], tokenizer, 0, keep_tokens=1, shuffle=True,
                                 tag_dropout=0.1)
    return data.image_batches(dataset, order, 0, num_workers=args.num_workers), variation


def bare_bucketed_runner(args, tokenizer, text_encoder, unet, vae):
    """The limit on the same bucketed batches: VAE encode, forward, MSE, backward, AdamW; nothing else."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sources = tag_sources(args)
    batches, _ = bucketed_batches(args, sources, tokenizer)
    fixed = [next(batches) for _ in range(1 + args.rounds * args.steps)]  # the batches the full variant sees
    ids = data.tokenize(tokenizer, [s.caption for s in sources])
    state = {"step": 0}

    def run() -> None:
        batch = fixed[state["step"] % len(fixed)]
        with torch.no_grad():
            x0 = vae.encode(batch["pixel_values"]).latent_dist.mean
        timesteps = torch.randint(0, 1000, (x0.shape[0],))
        text = text_encoder(ids[batch["index"]], return_dict=False)[0]
        prediction = unet(x0 + torch.randn_like(x0), timesteps, text, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction, torch.randn_like(x0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

    return run


def bare_runner(args, tokenizer, text_encoder, unet):
    """Forward, MSE, backward, AdamW on one fixed batch: the limit."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size, n = args.latent_size, args.batch_size
    x_t, target = torch.randn(n, 4, size, size), torch.randn(n, 4, size, size)
    timesteps = torch.randint(0, 1000, (n,))
    ids = data.tokenize(tokenizer, [s.caption for s in data.shapes_sources(0, n)])

    def run() -> None:
        prediction = unet(x_t, timesteps, text_encoder(ids, return_dict=False)[0], return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def seconds_per_step(run, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=REPO / "training" / "configs" / "small")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--latent_size", type=int, default=16)
    parser.add_argument("--num_samples", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--with_vae", action="store_true", help="also time the uncached path (pixels -> frozen VAE)")
    parser.add_argument("--vae_config", type=Path, default=None, help="vae.json for --with_vae (default: <configs>/vae.json)")
    parser.add_argument("--bucketed", action="store_true",
                        help="also time bucketing + caption shuffle/tag dropout against a bare loop with VAE encode")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for the pixel paths")
    args = parser.parse_args()

    tokenizer, text_encoder, unet = build_models(args.configs, args.latent_size)
    variants = {
        "bare forward/backward/AdamW (limit)": bare_runner(args, tokenizer, copy.deepcopy(text_encoder), copy.deepcopy(unet)),
        "full training step, cached latents": full_step_runner(args, tokenizer, copy.deepcopy(text_encoder), copy.deepcopy(unet)),
    }
    if args.with_vae or args.bucketed:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**json.loads((args.vae_config or args.configs / "vae.json").read_text())).requires_grad_(False).eval()
    if args.with_vae:
        variants["full training step, VAE encode each step"] = full_step_runner(
            args, tokenizer, copy.deepcopy(text_encoder), copy.deepcopy(unet), vae)
    if args.bucketed:
        variants["bare + VAE encode, bucketed batches (limit)"] = bare_bucketed_runner(
            args, tokenizer, copy.deepcopy(text_encoder), copy.deepcopy(unet), vae)
        variants["full step, buckets + tag shuffle/dropout, VAE encode"] = full_step_runner(
            args, tokenizer, copy.deepcopy(text_encoder), copy.deepcopy(unet), vae, bucketed=True)
    for run in variants.values():  # warm-up
        seconds_per_step(run, 1)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            times[name].append(seconds_per_step(run, args.steps))
    print_table(times, args, variants)


def print_table(times: dict[str, list[float]], args, runs: dict) -> None:
    names = list(times)
    bare = statistics.median(times[names[0]])
    params = sum(p.numel() for p in build_models(args.configs, args.latent_size)[2].parameters()) / 1e6
    print(f"UNet {params:.1f}M params, latents 4x{args.latent_size}x{args.latent_size}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.num_workers} DataLoader workers, {args.rounds} rounds x "
          f"{args.steps} steps (medians)\n")
    print("| variant | s/step | samples/s | time vs bare | data wait/step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        median = statistics.median(times[name])
        timer = getattr(runs[name], "timer", None)
        wait = f"{1000 * timer.seconds / timer.count:.1f} ms" if timer and timer.count else "-"
        print(f"| {name} | {median:.3f} | {args.batch_size / median:.1f} | {median / bare:.3f}x | {wait} |")
    limit, full = "bare + VAE encode, bucketed batches (limit)", "full step, buckets + tag shuffle/dropout, VAE encode"
    if limit in times:
        ratio = statistics.median(times[full]) / statistics.median(times[limit])
        print(f"\nBucketing + caption processing: full step / its bare limit = {ratio:.3f}x (target <= 1.10x)")


if __name__ == "__main__":
    main()
