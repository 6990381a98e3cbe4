"""The LoRA and embedding pickers: names from --lora-dir / --embedding-dir added to the prompt as A1111's
extra networks add them (never a path)."""

from __future__ import annotations

import functools

import gradio as gr

from ldm_pipeline.service import GenerationService

ADAPTER_KINDS = {"lora": "LoRA", "embedding": "Embedding"}  # kind -> label (the folder flag is --KIND-dir)


def adapter_picker(service: GenerationService, prompt, prefix: str) -> None:
    """The LoRAs and embeddings of --lora-dir / --embedding-dir by name, each added to the prompt with its
    weight (`<lora:NAME:W>`, `(NAME:W)`) as A1111's extra networks do; shown when the folders offer any."""
    offered = {"lora": service.adapters.lora_names(), "embedding": service.adapters.embedding_names()}
    shown = {kind: choices for kind, choices in offered.items()
             if choices or (kind == "lora" and service.adapters.lora_dir is not None)}  # LoRAs may come later
    if not shown:
        return
    with gr.Accordion("LoRA and embeddings", open=True):
        for kind, choices in shown.items():
            with gr.Row(equal_height=False):
                name = gr.Dropdown(choices, value=choices[0] if choices else None, label=f"{ADAPTER_KINDS[kind]} (--{kind}-dir)",
                                   elem_id=f"{prefix}-{kind}-name", scale=3, min_width=140,
                                   allow_custom_value=kind == "lora")  # refreshed choices: add_to_prompt checks names
                weight = gr.Number(value=1.0, label=f"{ADAPTER_KINDS[kind]} weight", elem_id=f"{prefix}-{kind}-weight",
                                   scale=2, min_width=90)
                add = gr.Button(f"Add {ADAPTER_KINDS[kind]} to the prompt", elem_id=f"{prefix}-add-{kind}", size="sm",
                                scale=2, min_width=120)
            add.click(functools.partial(add_to_prompt, service, kind), inputs=[prompt, name, weight], outputs=prompt,
                      api_name=f"{prefix}_add_{kind}")
            if kind == "lora":  # the folder is read again: LoRAs copied in while the server runs (A1111's Refresh)
                refresh = gr.Button("Refresh the LoRA list", elem_id=f"{prefix}-refresh-lora", size="sm")
                refresh.click(functools.partial(refreshed_loras, service), inputs=name, outputs=name,
                              api_name=f"{prefix}_refresh_lora")


def refreshed_loras(service: GenerationService, current: str | None):
    """The LoRA menu with the names --lora-dir holds now (the current choice kept while it is still there)."""
    names = service.adapters.lora_names()
    return gr.update(choices=names, value=current if current in names else (names[0] if names else None))


def add_to_prompt(service: GenerationService, kind: str, prompt: str, name: str, weight: float) -> str:
    """`prompt` + the tag of LoRA / embedding `name` (a name offered by its folder, never a path)."""
    offered = service.adapters.lora_names() if kind == "lora" else service.adapters.embedding_names()
    if name not in offered:
        raise gr.Error(f"{ADAPTER_KINDS[kind]} {name!r} is not in --{kind}-dir; choose one of "
                       f"{', '.join(offered) or 'none'}.", title="Invalid request")
    if weight is None:
        raise gr.Error(f"{ADAPTER_KINDS[kind]} weight is empty: type a number (1 = full strength).",
                       title="Invalid request")
    tag = f"<lora:{name}:{weight:g}>" if kind == "lora" else name if weight == 1 else f"({name}:{weight:g})"
    return f"{prompt.rstrip()} {tag}" if prompt and prompt.strip() else tag
