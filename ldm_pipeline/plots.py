"""Plots of the noise schedules on a common axis (the web UI's Schedules tab, docs figures).

    figures = schedule_figures(1000)   # {"log-SNR(t)": Figure, "alpha-bar(t)": Figure, "beta(t)": Figure}

Rectified flow is not variance preserving; it is drawn through the VP schedule with the same
SNR (`vp_equivalent_alpha_bar`), so every curve is comparable on the same axes.
"""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")  # servers have no display; figures are rendered to images
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from custom_schedulers.schedules import alphas_cumprod_to_betas, named_schedules  # noqa: E402


def vp_equivalent_alpha_bar(schedule) -> torch.Tensor:
    """alpha-bar of the VP schedule with the same SNR: snr / (1 + snr) (equals alpha^2 for VP schedules)."""
    s = schedule.snr
    return s / (1 + s)


def _curve_style(name: str, names: list[str]) -> dict:
    """One colour per base schedule; variants (zero-terminal SNR, shift) of it dashed."""
    def base(n: str) -> str:
        return re.split(r" \+|,| \(", n)[0]

    bases = list(dict.fromkeys(base(n) for n in names))
    variant = re.search(r" \+|,", name) is not None
    return {"color": f"C{bases.index(base(name))}", "linestyle": "--" if variant else "-"}


def schedule_figures(num_train_timesteps: int = 1000) -> dict[str, plt.Figure]:
    """log-SNR(t), alpha-bar(t) and beta(t) for every named schedule, one figure each.

    Rectified flow is not variance preserving; its alpha-bar and beta are those of the
    VP schedule with the same SNR, so every curve is comparable on the same axes.
    """
    schedules = named_schedules(num_train_timesteps)
    curves = {"log-SNR(t)": {}, "alpha-bar(t)": {}, "beta(t)": {}}
    for name, schedule in schedules.items():
        abar = vp_equivalent_alpha_bar(schedule)
        curves["log-SNR(t)"][name] = schedule.log_snr
        curves["alpha-bar(t)"][name] = abar
        curves["beta(t)"][name] = alphas_cumprod_to_betas(abar)
    t = [i / (num_train_timesteps - 1) for i in range(num_train_timesteps)]
    figures = {}
    for title, by_name in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        for name, values in by_name.items():
            ax.plot(t, values.numpy(), label=name, linewidth=1.4, **_curve_style(name, list(schedules)))
        ax.set_xlabel("t / T  (0 = clean, 1 = pure noise)")
        ax.set_title(title)
        if title == "beta(t)":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        figures[title] = fig
        plt.close(fig)
    return figures
