"""The web input guard's pieces without a server: upload ledger, path rules, value checks, message redaction."""

from __future__ import annotations

import math
import os

import gradio as gr
import pytest

from ldm_pipeline import web_inputs
from ldm_pipeline.web_inputs import UploadLedger, check_value, file_dicts, without_paths


def test_each_upload_lets_exactly_one_session_claim_its_path():
    ledger = UploadLedger()
    assert not ledger.claim("/cache/a/x.png", "s1")  # never uploaded
    ledger.record(["/cache/a/x.png"])
    assert not ledger.claim("/cache/a/x.png", None)  # no session, no claim
    assert ledger.claim("/cache/a/x.png", "s1") and ledger.claim("/cache/a/x.png", "s1")  # its owner, again
    assert not ledger.claim("/cache/a/x.png", "s2")  # someone else
    ledger.record(["/cache/a/x.png"])  # s2 uploads the same bytes: same content-hash path
    assert ledger.claim("/cache/a/x.png", "s2") and not ledger.claim("/cache/a/x.png", "s3")


def test_file_dicts_finds_files_at_any_depth():
    editor = {"background": {"path": "/a"}, "layers": [{"path": "/b", "meta": {}}], "composite": {"url": "http://x"}}
    assert [d.get("path") for d in file_dicts(editor)] == ["/a", "/b", None]
    assert file_dicts(["text", 3, None]) == []


def test_only_regular_files_below_the_folder_without_detours(tmp_path):
    folder = tmp_path / "cache"
    (folder / "h").mkdir(parents=True)
    (folder / "h" / "x.png").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"s")
    os.symlink(tmp_path / "secret", folder / "h" / "link.png")
    inside = web_inputs._inside_without_links
    assert inside(str(folder / "h" / "x.png"), str(folder))
    assert not inside(str(folder / "h" / "link.png"), str(folder))  # symlink out
    assert not inside(f"{folder}/h/../../secret", str(folder))  # '..'
    assert not inside(str(tmp_path / "secret"), str(folder))
    assert not inside(str(folder / "h"), str(folder))  # a folder
    assert not inside("h/x.png", str(folder))  # relative


@pytest.mark.parametrize("component, value, message", [
    (gr.Number(label="Steps", precision=0), 1.5, "Steps: must be a whole number, got 1.5"),
    (gr.Number(label="Steps", precision=0), "5", "Steps: must be a whole number, got '5'"),
    (gr.Number(label="Seed", precision=0), math.inf, "Seed: must be a whole number, got inf"),
    (gr.Number(label="Rescale"), math.nan, "Rescale: must be a number, got nan"),
    (gr.Number(label="Rescale"), True, "Rescale: must be a number, got True"),
    (gr.Slider(1, 30, label="Scale"), 31, "Scale: must be from 1 to 30, got 31"),
    (gr.Checkbox(label="Interval"), "yes", "Interval: must be true or false"),
    (gr.Textbox(label="Prompt"), 123, "Prompt: must be text, got 123"),
    (gr.Dropdown(["a", "b"], label="Mode"), "c", "Mode: unknown choice 'c': choose one of a, b"),
    (gr.Image(label="Init"), "/etc/hostname", "Init: expected an uploaded file"),
])
def test_values_of_the_wrong_kind_name_their_input(component, value, message):
    with pytest.raises(gr.Error) as refused:
        check_value(component, value)
    assert refused.value.message.startswith(message)


@pytest.mark.parametrize("component, value", [
    (gr.Number(precision=0), 4.0), (gr.Number(), -1), (gr.Slider(1, 30), 7.5), (gr.Checkbox(), False),
    (gr.Textbox(), ""), (gr.Dropdown(["a"], allow_custom_value=True), "z"), (gr.Number(), None),
])
def test_values_of_the_right_kind_pass(component, value):
    check_value(component, value)


def test_messages_lose_their_paths():
    text = "cannot identify image file '/tmp/gradio/ab12/x.png' (see C:\\data\\y.png); 3/4 done, http://h/p"
    assert without_paths(text) == "cannot identify image file '<path>' (see <path>); 3/4 done, http://h/p"
