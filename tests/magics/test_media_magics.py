"""%%lora train finds the notebook's processor for an image model; %lora compare takes a variable holding an
image."""

from __future__ import annotations

import pytest

from tests.media_models import shapes, vit, vit_processor
from tests.shell_cells import run

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


def test_train_and_compare_an_image_model_from_cells(ip, tmp_path):
    import jupyter_lora as jl

    ip.user_ns.update(
        model=jl.inject(vit(), r=4), proc=vit_processor(), data=shapes(16), picture=shapes(1)[0]["image"]
    )
    run(
        ip,
        f"%%lora train model\ndata: data\nsteps: 2\nbatch: 8\neval: 0\noutput_dir: {tmp_path / 'r'}",
    )
    last = jl.last_run(ip.user_ns["model"])
    last.finished.wait(60)
    assert last.state == "finished" and last.data.unit == "images"
    comparison = run(ip, "%lora compare model picture")
    assert comparison.kind == "classification" and comparison.labels == ("circle", "square")
    assert comparison.prompt == "image 16×16"


def test_compare_shows_a_vision_language_model_an_image_from_a_cell(ip):
    """`%lora compare MODEL "prompt" --image VAR --processor VAR`: the same replies as the Python call, the
    processor's own tokenizer formatting the prompt (no separate tokenizer needed)."""
    import torch

    import jupyter_lora as jl
    from tests.vision_models import RED, build, square

    model, processor = build("gemma3")
    model = jl.inject(model, r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    picture = square(RED)
    ip.user_ns.update(model=model, proc=processor, picture=picture)
    shown = run(ip, '%lora compare model "color?" --image picture --processor proc --max-new-tokens 4')
    expected = jl.compare(model, "color?", images=[picture], processor=processor, max_new_tokens=4)
    assert (shown.adapter, shown.base) == (expected.adapter, expected.base)
    text_only = run(ip, '%lora compare model "color?" --max-new-tokens 4')  # the notebook's one processor
    assert text_only.adapter == jl.compare(model, "color?", processor=processor, max_new_tokens=4).adapter
