"""Schedule plots (the UI's Schedules tab): every named schedule drawn, flow comparable with VP."""

from __future__ import annotations

import math

import numpy as np

from custom_schedulers.schedules import named_schedules
from ldm_pipeline.plots import schedule_figures, vp_equivalent_alpha_bar


def test_schedule_figures_plot_every_named_schedule():
    figures = schedule_figures(num_train_timesteps=200)
    assert set(figures) == {"log-SNR(t)", "alpha-bar(t)", "beta(t)"}
    schedules = named_schedules(200)
    for title, figure in figures.items():
        lines = figure.axes[0].get_lines()
        assert [line.get_label() for line in lines] == list(schedules), title
    # The plotted log-SNR of the SD schedule is the schedule's own, point for point.
    sd_line = figures["log-SNR(t)"].axes[0].get_lines()[1]
    np.testing.assert_allclose(sd_line.get_ydata(), schedules["scaled_linear (SD)"].log_snr.numpy())


def test_vp_equivalent_alpha_bar_is_alpha_squared_for_vp_and_matches_snr_for_flow():
    schedules = named_schedules(100)
    sd, flow = schedules["scaled_linear (SD)"], schedules["rectified flow"]
    np.testing.assert_allclose(vp_equivalent_alpha_bar(sd).numpy(), sd.alphas_cumprod.numpy(), rtol=1e-12)
    abar = vp_equivalent_alpha_bar(flow)
    # A VP schedule with this alpha-bar has the flow schedule's SNR: abar / (1 - abar) = ((1-s)/s)^2.
    s = flow.sigma
    mid = slice(1, -1)
    np.testing.assert_allclose((abar / (1 - abar))[mid].numpy(), (((1 - s) / s) ** 2)[mid].numpy(), rtol=1e-9)
    assert math.isclose(float(abar[-1]), 0.0, abs_tol=1e-12)
