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
