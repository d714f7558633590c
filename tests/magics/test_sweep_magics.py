"""%%lora sweep in a real shell: the body parses from the schema, the sweep runs in the background with the text
observer, the variable holds what was kept, and a bad key is one line."""

from __future__ import annotations

import pytest
from shell_cells import run as _cell
from shell_cells import usage_error

import jupyter_lora as jl
from jupyter_lora.magics import parse as p

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

SETUP = (
    "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "model = tiny_model('llama')\n"
    "tok = tiny_tokenizer()\n"
    "texts = ['the quick brown fox jumps over the lazy dog.'] * 24\n"
)


def test_parse_sweep_body():
    cmd = p.parse(
        "sweep model", "data: texts\ngrid: {r: [4, 8], method: [lora, full]}\nkeep: none\nlearning_rate: 1e-3"
    )
    assert isinstance(cmd, p.SweepCommand) and cmd.model == "model"
    assert cmd.grid == {"r": [4, 8], "method": ["lora", "full"]}
    assert cmd.settings == {"data": "texts", "keep": "none", "lr": 1e-3}
    assert p.parse("sweep model", "data: texts\nprogress: text").settings["progress"] == "text"
    with pytest.raises(jl.UsageError, match=r"(?i)did you mean `steps`"):
        p.parse("sweep model", "data: texts\nstepz: 3")
    assert "%%lora sweep MODEL" in p.USAGE and "num_virtual_tokens" in p.USAGE


def test_sweep_cell_runs_in_the_background_and_rebinds_the_model(ip, tmp_path, capsys):
    _cell(ip, SETUP)
    shown = _cell(ip, f"%%lora sweep model\ndata: texts\ntokenizer: tok\ngrid: {{r: [4, 8]}}\nkeep: best\nsteps: 2\n"
                   f"eval: 8\neval_every: 1\nseq: 32\nlr: 3e-3\nbatch: 4\noutput_dir: {tmp_path / 's'}")  # fmt: skip
    assert shown is None  # the cell shows the leaderboard (text here: no kernel); the Sweep is last_sweep's
    sw = jl.last_sweep(ip.user_ns["model"])
    sw.wait(120)
    out = capsys.readouterr().out
    assert "[1] 01-lora-r_4: running (lora)" in out
    assert "[1] 01-lora-r_4: finished" in out and "[2] 02-lora-r_8: finished" in out
    held = ip.user_ns["model"]
    assert held is sw.model and jl.status(held).active == (sw.best["run"],)


def test_unknown_sweep_key_is_one_line(ip, capsys):
    _cell(ip, SETUP)
    line = usage_error(ip, capsys, "%%lora sweep model\ndata: texts\ngrid: {rr: [4, 8]}")
    assert "did you mean `r`" in line.lower()


def test_lora_stop_stops_the_whole_sweep(ip, tmp_path):
    """`%lora stop MODEL` during a sweep ends the sweep (the current run checkpoints; the rest is "not run"),
    not just the run in progress."""
    _cell(ip, SETUP)
    _cell(ip, f"%%lora sweep model\ndata: texts\ntokenizer: tok\ngrid: {{r: [2, 4, 8]}}\nkeep: none\nsteps: 400\n"
              f"seq: 32\nbatch: 4\neval: 0\nprogress: text\noutput_dir: {tmp_path / 's'}")  # fmt: skip
    sweep = jl.last_sweep(ip.user_ns["model"])
    import time

    deadline = time.monotonic() + 60
    while sweep.current is None and time.monotonic() < deadline:
        time.sleep(0.05)
    note = _cell(ip, "%lora stop model")
    assert "Stopped the sweep of `model`" in repr(note) and "%lora resume model" in repr(note)
    sweep.wait(60)
    statuses = [row["status"] for row in sweep.table.rows]
    assert statuses[0] == "stopped" and set(statuses[1:]) == {"not run"}, statuses
