"""Live previews: the fitted latent -> RGB map against the VAE it approximates, and previews during a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_pipeline import GenerationOptions
from ldm_pipeline.previews import LatentPreviewer, decoded_blocks, fit_latents
from ldm_pipeline.service import GenerationService, ServiceRequest


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    return GenerationService.load(tiny_model_dir, tmp_path_factory.mktemp("preview-outputs"), device="cpu")


def test_least_squares_solution_recovers_a_known_affine_map():
    """Closed form: data made by an exact affine map is fitted exactly."""
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    latents = torch.randn(3, 4, 5, 6, generator=g)
    rgb = torch.einsum("nchw,cd->ndhw", latents, weight) + bias[None, :, None, None]
    fitted = LatentPreviewer.from_pairs(latents, rgb)
    assert torch.allclose(fitted.weight, weight, atol=1e-4) and torch.allclose(fitted.bias, bias, atol=1e-4)


@pytest.mark.parametrize("which", ["embedded default model (trained)", "tiny test model (random weights)"])
def test_fitted_map_approximates_the_vae_on_held_out_latents_better_than_the_mean_colour(service, which):
    from diffusers import AutoencoderKL

    from ldm_pipeline.loading import DEFAULT_MODEL_DIR

    trained = which.startswith("embedded")
    vae = AutoencoderKL.from_pretrained(DEFAULT_MODEL_DIR / "vae") if trained else service.pipe.vae
    previewer = LatentPreviewer.fit(vae) if trained else service.previewer()
    held_out = fit_latents(vae.config.latent_channels, seed=123)
    truth = decoded_blocks(vae, held_out)
    error = ((previewer.rgb(held_out) - truth) ** 2).mean()
    baseline = ((truth.mean(dim=(0, 2, 3), keepdim=True) - truth) ** 2).mean()  # one colour everywhere
    assert error < (0.6 if trained else 0.95) * baseline, (float(error), float(baseline))


def test_a_30_step_run_yields_previews_that_change_before_the_final_image(service):
    previews = []
    request = ServiceRequest(GenerationOptions(prompt="a red circle", num_inference_steps=30, width=64, height=64,
                                               seed=5), sampler="euler")
    results = service.generate(request, on_preview=lambda step, total, images: previews.append((step, images)),
                               preview_every=5)
    assert [step for step, _ in previews] == [5, 10, 15, 20, 25] and len(results) == 1
    arrays = [np.asarray(images[0], dtype=np.int16) for _, images in previews]
    assert arrays[0].shape == (64, 64, 3)
    changed = sum(np.abs(a - b).mean() > 0.5 for a, b in zip(arrays, arrays[1:]))
    assert changed >= 2


def test_full_previews_are_the_pipelines_own_decode_of_the_current_latents(service):
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    shown = service.previewer("full").images(latents)
    with torch.no_grad():
        decoded = service.pipe._decode(latents, "np")
    side = 4 * service.pipe.vae_scale_factor
    assert [image.size for image in shown] == [(side, side)] * 2
    for image, expected in zip(shown, decoded):
        assert np.abs(np.asarray(image, dtype=np.int16) - np.round(expected * 255)).max() <= 1
    with pytest.raises(ValueError, match="Unknown preview mode 'fast': choose one of cheap, full"):
        service.previewer("fast")


def test_a_run_with_full_previews_shows_them_at_the_requested_steps(service):
    previews = []
    request = ServiceRequest(GenerationOptions(prompt="a red circle", num_inference_steps=6, width=32, height=32,
                                               seed=5), sampler="euler")
    service.generate(request, on_preview=lambda step, total, images: previews.append((step, images[0].size)),
                     preview_every=2, preview_mode="full")
    assert previews == [(2, (32, 32)), (4, (32, 32))]
