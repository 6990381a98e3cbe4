"""Training: the accelerate training script (`python -m training.train`), its objectives, data and checkpoints.

`train.py` (wiring and entry point), `config.py` (typed options -> flags and config files),
`data.py` (shapes pool, image folders, step-indexed batch order, latents), `objectives.py`
(noise levels, targets, Min-SNR weights), `losses.py` (diffusion and VAE losses of one
micro-batch), `train_loop.py` (the step loop), `checkpointing.py` (atomic accelerate
checkpoints), `load_and_save.py` (models in, pipeline folders out), `lora.py`,
`validation.py` and `sampling.py` (validation loss and images), `shapes.py` (the dataset
generator), `tokenizer.py` (the local word-level CLIP tokenizer).
"""
