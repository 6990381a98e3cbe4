"""Wall time per image: our pipeline vs stock diffusers `StableDiffusionPipeline`, same components.

Two model shapes, random weights, same scheduler (DDIM, SD 1.5 betas), same seed, constant CFG:

* tiny:   the test components (training/tiny_models.py), 32x32 pixels;
* sd15:   a UNet with Stable Diffusion 1.5's config (860M parameters), SD's VAE shape and a
          CLIP-L-shaped text encoder (tiny vocabulary), at --sd15-size pixels.

Rows: stock, ours at equal work (ratio target <= 1.0), ours with guidance intervals in the
range Kynkaenniemi et al. 2024 use ((0.28, 5.42] for SD-XL, and a narrower one) (ratio
target < 0.85), with the mean absolute pixel difference (images in [0, 1]) to our fully
guided image. Warm-up first, then the variants interleaved (rotating order), repeated. Times are the
process' CPU time with one torch thread (the work done; wall time on a machine shared with
other jobs is shown too but is noisy); "ratio" is the median over repeats of (variant /
stock in the same repeat). Prints a Markdown table.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/pipeline_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from ldm_pipeline import LatentTextToImagePipeline  # noqa: E402
from ldm_pipeline.guidance import recommended_guidance_rescale  # noqa: E402
from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_sd_components, tiny_tokenizer  # noqa: E402

INTERVALS = {"ours + interval (0.28, 5.42]": (0.28, 5.42), "ours + interval (0.28, 2.9]": (0.28, 2.9)}
PROMPT = "a large red circle on a blue background at the top left"


def sd15_components(seed: int = 0) -> dict:
    """SD 1.5-shaped UNet and VAE, CLIP-L-shaped text encoder; random weights."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()
    vocab = len(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu",
    )).eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG), "safety_checker": None,
            "feature_extractor": None, "image_encoder": None}


def pipelines(components: dict):
    stock = StableDiffusionPipeline(**components, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    ours = LatentTextToImagePipeline(**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    return stock, ours


def runners(stock, ours, size: int, steps: int, output_type: str = "np") -> dict:
    rescale = recommended_guidance_rescale(ours.scheduler.config)  # 0.7 for zero-terminal-SNR models, both sides
    common = {"num_inference_steps": steps, "guidance_scale": 7.5, "guidance_rescale": rescale, "width": size,
              "height": size, "output_type": output_type}

    def run_stock():
        return stock(PROMPT, generator=[torch.Generator().manual_seed(0)], **common).images

    def run_ours():
        return ours(PROMPT, seed=0, progress_bar=False, **common).images

    def run_interval(interval):
        return lambda: ours(PROMPT, seed=0, progress_bar=False, guidance_interval=interval, **common).images

    return {"stock": run_stock, "ours": run_ours, **{k: run_interval(v) for k, v in INTERVALS.items()}}


def timed(fn):
    """(CPU seconds, wall seconds, output). With one torch thread, the process' CPU time is the
    work done, unaffected by other jobs on a shared machine; wall time is reported beside it."""
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def measure(name: str, components: dict, size: int, steps: int, repeats: int) -> list[str]:
    stock, ours = pipelines(components)
    runs = runners(stock, ours, size, steps)
    outputs = {k: timed(fn)[2] for k, fn in runs.items()}  # warm-up
    times = {k: [] for k in runs}
    walls = {k: [] for k in runs}
    order = list(runs)
    for r in range(repeats):
        for key in order[r % len(order):] + order[: r % len(order)]:  # interleaved, rotating who goes first
            cpu, wall, _ = timed(runs[key])
            times[key].append(cpu)
            walls[key].append(wall)
    evaluations = {"stock": 2 * steps, "ours": 2 * steps}
    for key, interval in INTERVALS.items():
        evaluations[key] = ours(PROMPT, seed=0, progress_bar=False, output_type="latent", num_inference_steps=steps,
                                width=size, height=size, guidance_interval=interval).unet_evaluations
    rows = []
    for key in runs:
        median = statistics.median(times[key])
        ratio = statistics.median(t / s for t, s in zip(times[key], times["stock"]))
        diff = np.abs(outputs[key] - outputs["ours"]).mean()
        wall = statistics.median(walls[key])
        rows.append(f"| {name} | {size}x{size} | {steps} | {key} | {evaluations[key]} | {median:.3f} | {ratio:.3f} "
                    f"| {wall:.3f} | {diff:.4f} |")
    return rows


def overhead_only(repeats: int, steps: int) -> str:
    """Everything but the networks: the tiny UNet's forward replaced by a constant-time stand-in,
    latents returned (no VAE decode). What remains is each pipeline's own per-call and per-step cost."""
    components = tiny_sd_components()
    stock, ours = pipelines(components)
    components["unet"].forward = lambda sample, t, encoder_hidden_states=None, return_dict=True, **kw: (0.1 * sample,)
    runs = runners(stock, ours, 32, steps, output_type="latent")
    times = {"stock": [], "ours": []}
    for r in range(repeats):
        for key in ("stock", "ours") if r % 2 else ("ours", "stock"):
            times[key].append(timed(runs[key])[0])
    stock_ms, ours_ms = (1000 * statistics.median(times[k]) for k in ("stock", "ours"))
    return f"Pipeline overhead without UNet and VAE ({steps} steps, CFG): stock {stock_ms:.1f} ms, ours {ours_ms:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sd15-size", type=int, default=128)
    parser.add_argument("--sd15-repeats", type=int, default=3)
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--model", default=None,
                        help="also measure a trained model (a folder; 'default' = the embedded model) at its native "
                             "size: there the pixel difference says whether the interval keeps the image close")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.repeats} (tiny) / {args.sd15_repeats} (sd15) interleaved repeats after warm-up; medians\n")
    print("| model | size | steps | pipeline | UNet evals / image | CPU s / image | ratio to stock (CPU) "
          "| wall s / image | mean abs diff to ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in measure("tiny", tiny_sd_components(), 32, args.steps, args.repeats):
        print(row, flush=True)
    overhead = overhead_only(2 * args.repeats, args.steps)
    if not args.skip_sd15:
        for row in measure("SD-1.5-shaped", sd15_components(), args.sd15_size, args.steps, args.sd15_repeats):
            print(row, flush=True)
    if args.model:
        for row in measure(*trained_model(args.model), args.steps, args.repeats):
            print(row, flush=True)
    print(f"\n{overhead}")


def trained_model(model: str) -> tuple[str, dict, int]:
    """(name, components, native size) of a trained model, loaded with `load_pipeline`."""
    from ldm_pipeline import load_pipeline

    pipe = load_pipeline(None if model == "default" else model, device="cpu")
    components = {**pipe.components, "safety_checker": None, "feature_extractor": None, "image_encoder": None}
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return ("default model" if model == "default" else Path(model).name), components, size


if __name__ == "__main__":
    main()
