"""Training: the accelerate training script (`python -m training.train`), its objectives, data and checkpoints.

`train.py` (wiring and entry point), `config.py` (typed options -> flags and config files),
`data.py` (shapes pool, image folders, step-indexed batch order, latents), `objectives.py`
(noise levels, targets, Min-SNR weights), `losses.py` (diffusion and VAE losses of one
micro-batch), `train_loop.py` (the step loop), `checkpointing.py` (atomic accelerate
checkpoints), `load_and_save.py` (models in, pipeline folders out), `lora.py`,
`validation.py` and `sampling.py` (validation loss and images), `shapes.py` (the dataset
generator), `tokenizer.py` (the local word-level CLIP tokenizer), `sdxl.py` (SDXL's two text
encoders, size conditioning and cached caption embeddings in training).

Fine-tuning as kohya users do: `buckets.py` (aspect-ratio buckets), `captions.py` (kohya
folders, tag shuffle/dropout), `hf_data.py` (local Hugging Face datasets), `shards.py`
(WebDataset shards), `lora.py` + `lora_export.py` (LoRA/DoRA/LoHa/LoKr; diffusers, kohya and
peft files), `optimizers.py` (optimizers by name), `loss_options.py` (masked loss, debiased
estimation, multi-resolution noise), `dreambooth.py` (prior preservation),
`textual_inversion.py`.
"""
