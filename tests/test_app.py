"""The UI module's own pieces, without a server: command line, form -> request, checks, PNG info."""

from __future__ import annotations

import re

import pytest

import app
from ldm_pipeline.options import MAX_SIDE, GenerationOptions
from ldm_pipeline.service import GenerationService
from webui.form import MAX_BATCH_SIZE, SDXL_SETTING_NAMES, SETTING_NAMES, request_from_form, sdxl_options
from webui.parameters import fields_to_settings, png_info
from webui.schedules_tab import REPO_DIR, accuracy_table_markdown

FORM = dict(  # the txt2img fields in the order SETTING_NAMES lists them
    prompt="a red circle", negative_prompt="", sampler="ddim", schedule_type="Automatic", steps=4, guidance_scale=7.5,
    guidance_schedule="constant", guidance_min_scale=1.0, use_interval=False, sigma_lo=0.28, sigma_hi=5.42,
    guidance_rescale=-1.0, width=32.0, height=32.0, seed=-1.0, batch_count=1.0, batch_size=1.0,
    guidance_method="cfg", apg_eta=0.0, apg_norm_threshold=15.0, apg_momentum=-0.5, cfg_zero_init_steps=1.0,
    pag_scale=0.0, pag_layers="mid",
)


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    return GenerationService.load(tiny_model_dir, tmp_path_factory.mktemp("app-outputs"), device="cpu")


def check_form(service, **changes) -> None:
    """What a Generate click checks before the model runs: the form's own limits, then the record's check."""
    service.check(request_from_form({**FORM, **changes}))


def test_cli_binds_localhost_by_default_and_share_is_opt_in():
    args = app.parse_args([])
    assert args.host == "127.0.0.1"
    assert args.share is False
    assert args.model is None
    args = app.parse_args(["--model", "/m", "--host", "0.0.0.0", "--port", "9000", "--share"])
    assert (args.model, args.host, args.port, args.share) == ("/m", "0.0.0.0", 9000, True)


def test_cli_rejects_zero_concurrency(capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--concurrency", "0"])
    assert "--concurrency must be at least 1" in capsys.readouterr().err


def test_valid_request_passes(service):
    check_form(service)
    check_form(service, seed=0, width=64, height=2048, batch_size=MAX_BATCH_SIZE)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"width": 30}, "Width must be a multiple of 8"),
        ({"height": MAX_SIDE + 8}, "Height must be a multiple of 8"),
        ({"steps": 0}, "Steps (num_inference_steps) must be a whole number from 1"),
        ({"steps": 2.5}, "Steps (num_inference_steps) must be a whole number from 1"),
        ({"batch_size": MAX_BATCH_SIZE + 1}, "Batch size must be from 1"),
        ({"batch_count": 0}, "Batch count must be from 1"),
        ({"sampler": "nope"}, "Unknown sampler 'nope': choose one of ddim, ddpm"),
        ({"prompt": "   "}, "The prompt is empty"),
        ({"seed": -2}, "Seed must be -1 (random)"),
    ],
)
def test_invalid_request_names_the_problem(service, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_form(service, **changes)


def test_all_problems_reported_at_once(service):
    with pytest.raises(ValueError) as error:
        check_form(service, width=31, steps=0)
    assert "Width" in str(error.value) and "Steps" in str(error.value)


def test_accuracy_table_shown_when_present_and_explained_when_missing(tmp_path):
    table = tmp_path / "sampler_accuracy.md"
    table.write_text("| sampler | error |\n|---|---|\n| ddim | 0.1 |\n")
    assert accuracy_table_markdown(table) == table.read_text()
    note = accuracy_table_markdown(REPO_DIR / "docs" / "no_such_table.md")
    assert "missing" in note and "benchmarks/sampler_accuracy.py" in note


def settings_from_png(tmp_path, parameters: str) -> tuple[str, dict]:
    """The PNG-info tab on a PNG carrying only A1111 `parameters` text: (text shown, txt2img values it fills)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    text, fields = png_info(str(path))
    updates = dict(zip(SETTING_NAMES, fields_to_settings(fields)))
    return text, {name: u.get("value") for name, u in updates.items() if "value" in u}


def test_png_info_fields_fill_the_txt2img_settings(tmp_path):
    # a PNG as AUTOMATIC1111 writes it (parameters text only, no recipe)
    text, values = settings_from_png(tmp_path, "a cat, best quality\nNegative prompt: blurry\n"
                                               "Steps: 25, Sampler: Euler a, CFG scale: 6.5, Seed: 99, Size: 512x768, "
                                               "Model: sd15")
    assert text.startswith("a cat, best quality")
    assert values == {"prompt": "a cat, best quality", "negative_prompt": "blurry", "steps": 25,
                      "guidance_scale": 6.5, "seed": 99, "width": 512, "height": 768,
                      "sampler": "euler-a", "schedule_type": "Automatic"}  # A1111's "Euler a", its own schedule


def test_png_info_of_a_recipe_that_cannot_replay_says_why(tmp_path):
    from PIL import Image

    from ldm_pipeline import metadata

    recipe = {"prompt": "a red circle", "steps": 4, "seed": 72, "width": 32, "height": 32,
              "guidance": {"scale": 6.0}, "noise": {"source": "shared_generator", "images": 2, "index": 1}}
    path = metadata.write_png(tmp_path / "shared.png", Image.new("RGB", (8, 8)), recipe)
    text, fields = png_info(str(path))
    assert "one torch.Generator drew the noise of all 2 images" in text
    assert fields["prompt"] == "a red circle" and fields["seed"] == 72  # from the parameters text


def test_png_info_explains_a_png_without_parameters(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert png_info(str(path)) == ("This PNG carries no generation parameters.", {})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert png_info(str(tmp_path / "broken.png"))[0].startswith("Cannot read this file as a PNG")


def test_form_values_become_a_request():
    form = dict(zip(SETTING_NAMES, ["a cat", "", "ddim", "Automatic", 3.0, 7.5, "cosine", 2.0, True, 0.5, 9.0, -1.0,
                                        32.0, 48.0, -1.0, 2.0, 3.0]))
    request = request_from_form(form)
    options = request.options
    assert (options.num_inference_steps, options.width, options.height, request.batch_count,
            options.num_images_per_prompt) == (3, 32, 48, 2, 3)
    assert options.guidance_interval == (0.5, 9.0) and options.guidance_rescale is None
    seeds = request.seeds()
    assert len(seeds) == 2 and seeds[1] == [seeds[0][0] + 3 + j for j in range(3)]
    form.update(use_interval=False, guidance_rescale=0.7, seed=5.0)
    request = request_from_form(form)
    assert request.options.guidance_interval is None and request.options.guidance_rescale == 0.7
    assert request.seeds() == [[5, 6, 7], [8, 9, 10]]


def test_init_images_of_any_mode_become_8_bit_rgb():
    import numpy as np
    from PIL import Image

    from ldm_pipeline.options import as_rgb

    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    deep = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit PNG greyscale, mode I;16
    assert deep.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(as_rgb(deep)), np.repeat(grey[..., None], 3, axis=2))  # not clipped
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest transparent
    flat = np.asarray(as_rgb(Image.fromarray(rgba, "RGBA")))
    assert tuple(flat[0, 0]) == (255, 0, 0) and tuple(flat[1, 1]) == (255, 255, 255)  # transparency over white
    for image in (Image.fromarray(grey), Image.fromarray(grey).convert("P"), Image.fromarray(grey).convert("LA")):
        converted = as_rgb(image)
        assert converted.mode == "RGB" and converted.size == (16, 4)


def test_png_fields_fill_the_sdxl_settings():
    fields = {"prompt": "a cat", "prompt_2": "a dog", "original_size": (48, 40), "crops_coords_top_left": (4, 8)}
    names = [*SETTING_NAMES, *SDXL_SETTING_NAMES]
    updates = dict(zip(names, fields_to_settings(fields, names)))
    values = {name: u.get("value") for name, u in updates.items() if "value" in u}
    assert values == {"prompt": "a cat", "prompt_2": "a dog", "original_height": 48, "original_width": 40,
                      "crop_top": 4, "crop_left": 8}
    options = sdxl_options({**{n: 0 for n in SDXL_SETTING_NAMES}, "prompt_2": "", "negative_prompt_2": "x",
                                "target_height": 64, "target_width": 32})
    assert options == {"prompt_2": None, "negative_prompt_2": "x", "original_size": None,
                       "crops_coords_top_left": (0, 0), "target_size": (64, 32)}


def test_form_sends_only_the_chosen_guidance_methods_parameters(service):
    request = request_from_form({**FORM, "guidance_method": "apg", "apg_eta": 0.3, "pag_scale": 2.5,
                                     "pag_layers": "mid, up_blocks.0"})
    options = service.check(request)
    assert (options.guidance_method, options.apg_eta, options.apg_norm_threshold, options.apg_momentum) == (
        "apg", 0.3, 15.0, -0.5)
    assert options.cfg_zero_init_steps is None and options.pag_scale == 2.5
    assert options.pag_layers == ["mid", "up_blocks.0"]
    zero = service.check(request_from_form({**FORM, "guidance_method": "cfg-zero*", "cfg_zero_init_steps": 2.0}))
    assert zero.cfg_zero_init_steps == 2 and zero.apg_eta is None
    with pytest.raises(ValueError, match=r"CFG\+\+ .* Choose one of: ddim"):
        service.check(request_from_form({**FORM, "guidance_method": "cfg++", "sampler": "dpmpp-2m"}))


def test_png_info_fills_the_guidance_method_fields(tmp_path):
    _, values = settings_from_png(tmp_path, "a cat\nSteps: 20, Sampler: Euler a CFG++, CFG scale: 0.8, Seed: 3, "
                                            "Size: 64x64, pag_enabled: True, pag_scale: 3, pag_block: middle, "
                                            "pag_block_id: 0")
    assert values["guidance_method"] == "cfg++" and values["pag_scale"] == 3.0 and values["pag_layers"] == "mid"


def test_the_form_is_built_from_the_registry_and_the_settings_record(service):
    """New samplers, schedule types and guidance schedules appear in the form without touching app.py."""
    import gradio as gr

    from custom_schedulers import names, registry
    from ldm_pipeline.guidance import SCHEDULE_NAMES

    demo = app.build_ui(service)
    menus = {c.label: [value for _, value in c.choices] for c in demo.blocks.values() if isinstance(c, gr.Dropdown)}
    usable = {name for name in registry.available() if not isinstance(service.schedulers.get(name), Exception)}
    assert set(menus["Sampler"]) == usable and len(usable) > 20
    assert menus["Schedule type"] == names.schedule_types() and "Karras" in menus["Schedule type"]
    assert menus["Dynamic guidance"] == list(SCHEDULE_NAMES)
    numbers = {c.label: c.value for c in demo.blocks.values() if isinstance(c, gr.Number)}
    assert numbers["Minimum scale of the ramps"] == GenerationOptions().guidance_min_scale
