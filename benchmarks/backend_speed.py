"""Backends on the CPU: warm generation with the eager, traced and ONNX Runtime networks. Prints a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/backend_speed.py warm --repeats 10      # in-process, per image

The cold start (whole processes against stock diffusers) is `benchmarks/cold_start.py`.

warm: one pipeline per variant in one process, 10 steps with CFG at batch 1 and 8, on the embedded
model (64x64) and on a tiny SD-1.5-shaped model (SD 1.5's UNet block layout and 8x VAE, narrow
channels, random weights) at 256x256.

Every variant is warmed up first (this also fills the ONNX export cache and traces each shape),
then the variants run interleaved in rotating order; "ratio" is the median over repeats of
(variant / reference in the same repeat), so both sides see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from cold_start import PROMPT, REPO, median_ratio, rotate  # benchmarks/ is on sys.path when run as a script

# ---------------------------------------------------------------- warm, in-process


def tiny_sd15_folder(folder: Path) -> Path:
    """SD 1.5's UNet block layout (4 levels, 2 layers each, cross-attention in the first 3) and 8x VAE,
    narrow channels, random weights, the repository's word-level CLIP tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(REPO))
    from training.tiny_models import SD15_SCHEDULER_CONFIG, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32, layers_per_block=2, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1))
    scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)
    return folder


VARIANTS = {"eager": {}, "traced (`trace=True`)": {"trace": True}, "ONNX Runtime (`backend='onnx'`)": {"backend": "onnx"}}


def warm_case(model, size: int, batch: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """variant -> {"wall": [...], "cpu": [...]}, seconds per image."""
    from ldm_pipeline import load_pipeline

    pipes = {name: load_pipeline(model, **options) for name, options in VARIANTS.items()}

    def call(pipe, seed) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        pipe(PROMPT, num_inference_steps=10, guidance_scale=3.0, width=size, height=size, seed=seed,
             num_images_per_prompt=batch, progress_bar=False)
        return (time.perf_counter() - wall) / batch, (time.process_time() - cpu) / batch

    for pipe in pipes.values():
        call(pipe, 0), call(pipe, 0)
    times = {name: defaultdict(list) for name in pipes}
    for repeat in range(repeats):
        for name in rotate(list(pipes), repeat):
            wall, cpu = call(pipes[name], repeat)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def warm(repeats: int) -> str:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LDM_CACHE_DIR"] = tmp + "/cache"
        models = {"embedded": (None, 64), "tiny SD-1.5-shaped": (tiny_sd15_folder(Path(tmp) / "sd15"), 256)}
        for label, (model, size) in models.items():
            for batch in (1, 8):
                times = warm_case(model, size, batch, repeats)
                walls = {name: t["wall"] for name, t in times.items()}
                cpus = {name: t["cpu"] for name, t in times.items()}
                for name in VARIANTS:
                    rows.append(
                        f"| {label}, {size}x{size}, batch {batch} | {name} | {statistics.median(walls[name]):.3f} | "
                        f"{median_ratio(walls, name, 'eager'):.2f} | {statistics.median(cpus[name]):.3f} | "
                        f"{median_ratio(cpus, name, 'eager'):.2f} |")
                print(rows[-3:], file=sys.stderr, flush=True)
    return "\n".join([
        f"Warm, 10 steps with CFG (guidance 3), seconds per image, {repeats} interleaved repeats, torch "
        f"threads {torch.get_num_threads()} (ONNX Runtime intra-op threads the same), load average "
        f"{os.getloadavg()[0]:.1f} at the end.", "",
        "| case | networks | wall median | wall ratio vs eager | CPU median | CPU ratio vs eager |",
        "|---|---|---|---|---|---|", *rows,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("warm",))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(warm(args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
