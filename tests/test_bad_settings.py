"""One table of bad settings drives the pipeline (API), the CLI and the app: the same message from all three.

Every case is refused by `GenerationOptions.check` before the model runs; the pipeline raises
`InvalidOptions` (a ValueError and a TypeError), the CLI reports `skipped line N: <message>` and
exits 1 without writing an image, and the app's service refuses the request (the web UI shows
the text as a gr.Error) without writing anything. The form's own fields go through the app's
form -> request function; settings the form cannot send go to the service directly.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from diffusers import StableDiffusionPipeline

from ldm_pipeline import InvalidOptions, load_pipeline
from ldm_pipeline.generate import LINE_KEYS, main
from ldm_pipeline.options import MAX_SIDE, GenerationOptions
from ldm_pipeline.service import GenerationService, ServiceRequest
from training.tiny_models import tiny_sd_components
from webui.form import SETTING_NAMES, request_from_form

BASE = dict(prompt="a red circle", num_inference_steps=2, width=32, height=32, seed=1)
NAN, INF = math.nan, math.inf
STEPS = "Steps (num_inference_steps) must be a whole number from 1 to 999"  # the tiny model: SD's leading spacing, offset 1
WIDTH, HEIGHT = "Width must be a multiple of 8 (a whole number)", "Height must be a multiple of 8 (a whole number)"
SEED = "Seed (seed) must be a whole number from 0 to 2**63 - 1"
GUIDANCE = "Guidance scale (guidance_scale) must be a finite number from 0 to 100"
MIN_SCALE = "Guidance minimum scale (guidance_min_scale) must be a finite number from 0 to 100"
RESCALE = "Guidance rescale (guidance_rescale) must be from 0 to 1"
INTERVAL = "Guidance interval needs 0 <= sigma_lo < sigma_hi"
CLIP_SKIP = "Clip skip (clip_skip) must be a whole number from 0"

CASES = [  # (settings on top of BASE, what the message says)
    ({"num_inference_steps": 0}, STEPS),
    ({"num_inference_steps": -3}, STEPS),
    ({"num_inference_steps": 1.5}, STEPS),
    ({"num_inference_steps": "5"}, STEPS),
    ({"num_inference_steps": 1000}, STEPS),  # timestep 1000 would not exist
    ({"num_inference_steps": 100000}, STEPS),
    ({"width": 0}, WIDTH),
    ({"width": 32.0}, WIDTH),
    ({"width": 36}, WIDTH),
    ({"width": 100000}, WIDTH),
    ({"height": MAX_SIDE + 8}, HEIGHT),
    ({"height": "32"}, HEIGHT),
    ({"prompt": 123}, "prompt must be a string or a list of strings, got int"),
    ({"prompt": ""}, "The prompt is empty"),
    ({"prompt": "   "}, "The prompt is empty"),
    ({"negative_prompt": 5}, "negative_prompt must be a string or a list of strings, got int"),
    ({"seed": -1}, SEED),
    ({"seed": 2**63}, SEED),
    ({"seed": 2**64 + 5}, SEED),
    ({"seed": 1.5}, SEED),
    ({"seed": "7"}, SEED),
    ({"guidance_scale": NAN}, GUIDANCE),
    ({"guidance_scale": INF}, GUIDANCE),
    ({"guidance_scale": -INF}, GUIDANCE),
    ({"guidance_scale": 1e30}, GUIDANCE),
    ({"guidance_scale": -1.0}, GUIDANCE),
    ({"guidance_scale": "7"}, GUIDANCE),
    ({"guidance_min_scale": 1e30}, MIN_SCALE),
    ({"guidance_min_scale": NAN}, MIN_SCALE),
    ({"guidance_rescale": 1.5}, RESCALE),
    ({"guidance_rescale": NAN}, RESCALE),
    ({"guidance_schedule": "wobbly"}, "Unknown guidance schedule 'wobbly'"),
    ({"guidance_interval": [5.0, 1.0]}, INTERVAL),
    ({"guidance_interval": [NAN, 1.0]}, INTERVAL),
    ({"guidance_interval": [-1.0, 2.0]}, INTERVAL),
    ({"clip_skip": -1}, CLIP_SKIP),
    ({"clip_skip": 1.5}, CLIP_SKIP),
    ({"clip_skip": 50}, CLIP_SKIP),
    ({"num_images_per_prompt": 0}, "Images per prompt (num_images_per_prompt) must be a whole number >= 1"),
    ({"width": 30, "num_inference_steps": 0}, WIDTH),  # every problem at once, in one message
    ({"guidance_method": "cfg+"}, "Unknown guidance method (guidance_method) 'cfg+': choose one of cfg, apg, cfg++"),
    ({"guidance_method": 3}, "Unknown guidance method (guidance_method) 3"),
    ({"apg_eta": 0.5}, "APG eta (apg_eta) only applies to guidance_method='apg'; leave it out with 'cfg'."),
    ({"guidance_method": "apg", "apg_eta": NAN}, "APG eta (apg_eta) must be a finite number"),
    ({"guidance_method": "apg", "apg_norm_threshold": -1.0},
     "APG norm threshold (apg_norm_threshold) must be a finite number >= 0 (0 = off)"),
    ({"guidance_method": "apg", "apg_momentum": 1.0}, "APG momentum (apg_momentum) must be above -1 and below 1"),
    ({"guidance_method": "cfg-zero*", "cfg_zero_init_steps": 2},
     "CFG-Zero* zero-init steps (cfg_zero_init_steps) (2) must be fewer than the steps (2)"),
    ({"guidance_method": "cfg-zero*", "cfg_zero_init_steps": 0.5},
     "CFG-Zero* zero-init steps (cfg_zero_init_steps) must be a whole number >= 0"),
    ({"guidance_method": "apg", "cfg_zero_init_steps": 1},
     "CFG-Zero* zero-init steps (cfg_zero_init_steps) only applies to guidance_method='cfg-zero*'"),
    ({"pag_scale": -1.0}, "PAG scale (pag_scale) must be a finite number from 0 to 100 (0 = off)"),
    ({"pag_scale": INF}, "PAG scale (pag_scale) must be a finite number from 0 to 100 (0 = off)"),
    ({"pag_scale": 2.0, "pag_layers": []}, "PAG layers (pag_layers) must be UNet self-attention layer names"),
    ({"pag_scale": 2.0, "pag_layers": [3]}, "PAG layers (pag_layers) must be UNet self-attention layer names"),
]
IDS = [f"{i:02d}-{'+'.join(settings)}" for i, (settings, _) in enumerate(CASES)]
OPTION_TO_LINE_KEY = {option: key for key, option in LINE_KEYS.items() if option}
FORM_NUMBERS = {"num_inference_steps": "steps", "width": "width", "height": "height",
                "guidance_scale": "guidance_scale", "guidance_min_scale": "guidance_min_scale"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-settings") / "tiny"
    StableDiffusionPipeline(**tiny_sd_components(), requires_safety_checker=False).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pipe(model):
    return load_pipeline(model, device="cpu")


@pytest.fixture(scope="module")
def service(model, tmp_path_factory):
    return GenerationService.load(model, tmp_path_factory.mktemp("app-outputs"), device="cpu")


@pytest.fixture(scope="module")
def cli_messages(model, tmp_path_factory) -> tuple[int, dict[int, str], list]:
    """One CLI run over a prompt file with one line per case: exit code, line -> message, files made."""
    folder = tmp_path_factory.mktemp("cli-bad")
    lines = [json.dumps({OPTION_TO_LINE_KEY[k]: v for k, v in {**BASE, **settings}.items()}) for settings, _ in CASES]
    (folder / "bad.jsonl").write_text("\n".join(lines) + "\n")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--prompts", str(folder / "bad.jsonl"), "--model", str(model), "--out", str(folder / "out")])
    found = {int(m[1]): m[2] for m in re.finditer(r"^skipped line (\d+): (.*)$", err.getvalue(), re.M)}
    return code, found, sorted(p.name for p in (folder / "out").iterdir())


def pipeline_message(pipe, settings) -> str:
    with pytest.raises(InvalidOptions) as error:
        pipe(**{**BASE, **settings}, progress_bar=False)
    assert isinstance(error.value, ValueError) and isinstance(error.value, TypeError)
    return str(error.value)


def app_request(settings: dict) -> ServiceRequest:
    """Through the form when the form can send these values (numbers in its number fields), else direct."""
    values = {**BASE, **settings}
    numbers_only = all(isinstance(values[k], (int, float)) for k in FORM_NUMBERS if k in values)
    # Gradio sends every number as a float and the form reads a whole one as an int: 32.0 is only an API value
    numbers_only &= not any(isinstance(values[k], float) and values[k].is_integer() for k in ("width", "height"))
    if not set(settings) <= {*FORM_NUMBERS, "prompt", "negative_prompt", "guidance_schedule"} or not numbers_only \
            or not isinstance(values["prompt"], str) or not isinstance(values.get("negative_prompt", ""), str):
        return ServiceRequest(GenerationOptions(**values), sampler=None)
    form = dict(zip(SETTING_NAMES, ["", "", "ddim", "Automatic", 2, 7.5, "constant", 1.0, False, 0.28, 5.42, -1.0, 32, 32,
                                        values["seed"], 1, 1]))
    form.update({FORM_NUMBERS.get(k, k): v for k, v in values.items() if FORM_NUMBERS.get(k, k) in SETTING_NAMES})
    return request_from_form(form)


def app_message(service, settings) -> str:
    with pytest.raises(ValueError) as error:
        service.check(app_request(settings))
    return str(error.value)


def test_table_is_big_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_same_message_from_pipeline_cli_and_app(case, pipe, service, cli_messages):
    settings, expected = CASES[case]
    from_pipeline = pipeline_message(pipe, settings)
    assert expected in from_pipeline
    code, cli, files = cli_messages
    assert cli.get(case + 1) == from_pipeline  # `skipped line N: <the same message>`
    assert app_message(service, settings) == from_pipeline
    assert not list(service.outputs.iterdir())


def test_cli_exits_1_and_writes_no_image(cli_messages):
    code, cli, files = cli_messages
    assert code == 1 and len(cli) == len(CASES)
    assert files == ["manifest.jsonl"]


def test_a_guidance_schedule_returning_nan_is_refused_before_any_step(pipe):
    steps = []
    with pytest.raises(ValueError, match=r"Guidance schedule \(guidance_schedule\) gave w = nan at step 1"):
        pipe(**BASE, guidance_schedule=lambda tau: math.nan, callback=lambda info: steps.append(info.step),
             progress_bar=False)
    assert steps == []
