"""Debiased estimation, multi-resolution noise and masked loss against closed forms and kohya's formulas."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from custom_schedulers import parameterization
from training.loss_options import debiased_weights, latent_mask, pyramid_noise
from training.objectives import Objective, build_schedule


def test_debiased_epsilon_weights_are_kohyas():
    schedule = build_schedule("epsilon", "scaled_linear", 1000)
    snr = (schedule.alpha / schedule.sigma) ** 2
    kohya = 1 / torch.sqrt(torch.minimum(snr, torch.ones_like(snr) * 1000))  # apply_debiased_estimation
    torch.testing.assert_close(debiased_weights(snr, "epsilon"), kohya.to(torch.float64))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_debiased_weight_makes_every_loss_the_papers_epsilon_loss(prediction_type):
    """w_y |y error|^2 == |eps error|^2 / sqrt(SNR) for the same prediction seen as epsilon (SNR < 1000)."""
    schedule = build_schedule(prediction_type, "scaled_linear", 1000)
    t = torch.tensor([50, 300, 600, 999]) if prediction_type != "flow" else torch.tensor([100, 400, 700, 950])
    alpha, sigma = schedule.alpha[t].view(-1, 1), schedule.sigma[t].view(-1, 1)
    generator = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(4, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    x_t = alpha * x0 + sigma * eps
    target = parameterization.target(prediction_type, x0, eps, alpha, sigma)
    prediction = target + 0.1 * torch.randn(4, 16, generator=generator, dtype=torch.float64)
    eps_prediction = parameterization.convert(prediction, x_t, alpha, sigma, prediction_type, "epsilon")
    snr = (alpha / sigma).view(-1) ** 2
    assert (snr < 1000).all()
    ours = debiased_weights(snr, prediction_type) * ((prediction - target) ** 2).sum(1)
    paper = ((eps_prediction - eps) ** 2).sum(1) / snr.sqrt()
    torch.testing.assert_close(ours, paper)


def test_pyramid_noise_one_level_is_a_second_white_noise_normalised():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = pyramid_noise(noise, torch.Generator().manual_seed(5), iterations=1, discount=0.3)
    replay = torch.Generator().manual_seed(5)
    torch.rand((), generator=replay, dtype=torch.float64)  # r (unused at level 0: r**0 = 1)
    expected = noise + torch.randn(2, 4, 8, 8, generator=replay)
    torch.testing.assert_close(ours, expected / expected.std())


def test_pyramid_noise_has_unit_std_and_more_low_frequency_energy():
    noise = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    pyramid = pyramid_noise(noise, torch.Generator().manual_seed(1), iterations=6, discount=0.8)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    white_dc, pyramid_dc = (x.mean(dim=(2, 3)).var().item() for x in (noise, pyramid))
    assert white_dc == pytest.approx(1 / 1024, rel=0.2) and pyramid_dc > 20 * white_dc  # spatial means vary more


def test_masked_loss_closed_form():
    objective = Objective(build_schedule("epsilon", "scaled_linear", 1000), "epsilon")
    generator = torch.Generator().manual_seed(0)
    prediction, target = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(2))
    squared = (prediction - target) ** 2
    ones = torch.ones(2, 1, 8, 8)
    assert objective.loss(prediction, target, None, ones) == objective.loss(prediction, target, None)
    left = ones.clone()
    left[..., 4:] = 0
    expected = squared[..., :4].mean() * 0.5  # kohya's masked loss: not renormalised by the mask's area
    torch.testing.assert_close(objective.loss(prediction, target, None, left), expected)
    pixel_mask = torch.zeros(1, 1, 4, 4)
    pixel_mask[..., :2, :2] = 1
    pixel_mask[..., 0, 2] = 1
    torch.testing.assert_close(latent_mask(pixel_mask, torch.Size([1, 4, 2, 2])),
                               torch.tensor([[[[1.0, 0.25], [0.0, 0.0]]]]))  # 2x2 block means


def test_masked_training_run_black_masks_give_zero_loss_white_masks_the_plain_loss(tmp_path):
    from test_data import write_folder
    from test_train import args, summary

    from training.train import main

    folder = tmp_path / "images"
    write_folder(folder, {f"{i}.png": f"a red circle number {i}" for i in range(4)}, metadata=False)
    runs = {}
    for name, value in (("black", 0), ("white", 255), ("plain", None)):
        extra = ["--dataset", "folder", "--train_data_dir", str(folder), "--num_validation_samples", "1"]
        if value is not None:
            masks = tmp_path / f"masks-{name}"
            masks.mkdir()
            for i in range(4):
                Image.new("L", (20, 20), value).save(masks / f"{i}.png")
            extra += ["--masked_loss", "--conditioning_data_dir", str(masks)]
        main(args(tmp_path / name, *extra, steps=2))
        runs[name] = [loss for _, loss in summary(tmp_path / name)["loss_history"]]
    assert runs["black"] == [0.0, 0.0]
    assert runs["white"] == runs["plain"] and runs["plain"][0] > 0
    (tmp_path / "masks-black" / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask in .* for \['3.png'\]"):
        main(args(tmp_path / "x", "--dataset", "folder", "--train_data_dir", str(folder), "--masked_loss",
                  "--conditioning_data_dir", str(tmp_path / "masks-black")))


def test_debiased_and_multires_options_change_training(tmp_path):
    from test_train import args, summary

    from training.train import main

    main(args(tmp_path / "plain", "--prediction_type", "v_prediction"))
    main(args(tmp_path / "options", "--prediction_type", "v_prediction", "--debiased_estimation_loss",
              "--multires_noise_iterations", "4", "--multires_noise_discount", "0.3"))
    plain, options = (summary(tmp_path / r)["loss_history"] for r in ("plain", "options"))
    assert plain != options and all(0 < loss < 10 for _, loss in options)
