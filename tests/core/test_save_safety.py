"""Saving never loses what a user keeps on disk: a save replaces only what an earlier save wrote, keeps the user's
files beside it, refuses to turn an adapter directory into a merged model (or back) unless asked, honours the
umask, cleans up after killed saves, and turns a full disk or a too-long name into a one-line error with nothing
half-written."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import peft.peft_model
import pytest
import torch
import transformers.modeling_utils
from model_state import tree_snapshot
from safetensors import SafetensorError

import jupyter_lora as jl
from jupyter_lora.core.adapters import files
from jupyter_lora.core.errors import UsageError
from jupyter_lora.testing import tiny_inputs, tiny_model


def _adapted(seed: int = 1, targets: str = "q_proj,v_proj"):
    model = jl.inject(tiny_model("llama"), r=4, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _logits(model):
    with torch.no_grad():
        return model(**tiny_inputs(model)).logits


def _user_files(directory: Path) -> dict[str, bytes | None]:
    """A user's notes and logs beside a save: a file, a directory tree, a symlink."""
    (directory / "notes.md").write_text("lr 2e-4 was too high\n")
    (directory / "eval_logs" / "epoch1").mkdir(parents=True)
    (directory / "eval_logs" / "epoch1" / "scores.json").write_text('{"acc": 0.9}')
    (directory / "eval_logs" / "empty").mkdir()
    (directory / "latest").symlink_to("eval_logs/epoch1")
    return _snapshot_of(directory, ["notes.md", "eval_logs", "latest"])


def _snapshot_of(directory: Path, names: list[str]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for name in names:
        path = directory / name
        if path.is_symlink():
            out[name] = os.readlink(path).encode()
        elif path.is_dir():
            out.update({f"{name}/{k}": v for k, v in tree_snapshot(path).items()})
        else:
            out[name] = path.read_bytes()
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p for p in os.listdir(parent) if p.startswith("."))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------- what a save replaces


def test_adapter_save_into_a_merged_model_directory_is_refused(tmp_path):
    target = tmp_path / "merged"
    jl.save(_adapted(), target, merged=True)
    before = tree_snapshot(tmp_path)
    with pytest.raises(UsageError) as exc:
        jl.save(_adapted(seed=2), target)  # merged=True forgotten
    message = _one_line(exc)
    assert "merged model" in message and "model.safetensors" in message
    assert "merged=True" in message and "overwrite=True" in message
    assert tree_snapshot(tmp_path) == before


def test_merged_save_into_an_adapter_directory_is_refused(tmp_path):
    target = tmp_path / "adapter"
    jl.save(_adapted(), target)
    before = tree_snapshot(tmp_path)
    with pytest.raises(UsageError, match=r"holds an adapter saved earlier.*overwrite=True"):
        jl.save(_adapted(), target, merged=True)
    assert tree_snapshot(tmp_path) == before


def test_overwrite_switches_kind_replacing_only_the_earlier_save(tmp_path):
    target = tmp_path / "out"
    jl.save(_adapted(), target, merged=True)
    kept = _user_files(target)
    model = _adapted(seed=2)
    with pytest.warns(UserWarning, match=r"replaced .*config\.json.*model\.safetensors"):
        jl.save(model, target, overwrite=True)
    names = set(os.listdir(target))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"config.json", "model.safetensors", "generation_config.json"}
    assert _snapshot_of(target, ["notes.md", "eval_logs", "latest"]) == kept
    loaded = jl.load(tiny_model("llama"), target)
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5)


@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_resave_keeps_the_users_files(tmp_path, monkeypatch, merged, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "run1"
    jl.save(_adapted(), target, merged=merged)
    kept = _user_files(target)
    model = _adapted(seed=2, targets="k_proj")
    jl.save(model, target, merged=merged)
    assert _snapshot_of(target, ["notes.md", "eval_logs", "latest"]) == kept
    assert (target / "latest").is_symlink()
    if not merged:
        assert json.loads((target / "adapter_config.json").read_text())["target_modules"] == ["k_proj"]
    assert _leftovers(tmp_path) == []


def test_user_files_are_kept_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    target = tmp_path / "run1"
    jl.save(_adapted(), target)
    kept = _user_files(target)

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    jl.save(_adapted(seed=2), target)
    assert _snapshot_of(target, ["notes.md", "eval_logs", "latest"]) == kept
    assert _leftovers(tmp_path) == []


def test_files_added_while_the_save_is_written_are_kept(tmp_path, monkeypatch):
    target = tmp_path / "run1"
    jl.save(_adapted(), target)
    _user_files(target)
    original = peft.peft_model.safe_save_file

    def write(*args, **kwargs):
        (target / "late.txt").write_text("written during the save")
        (target / "eval_logs" / "epoch2.json").write_text("{}")
        return original(*args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", write)
    jl.save(_adapted(seed=2), target)
    assert (target / "late.txt").read_text() == "written during the save"
    assert (target / "eval_logs" / "epoch2.json").read_text() == "{}"
    assert (target / "eval_logs" / "epoch1" / "scores.json").is_file()
    assert _leftovers(tmp_path) == []


def test_foreign_files_beside_a_config_are_never_deleted(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "precious.bin").write_bytes(b"\x01" * 64)
    before = tree_snapshot(tmp_path)
    with pytest.raises(UsageError) as exc:
        jl.save(_adapted(), target)
    message = _one_line(exc)
    assert "precious.bin" in message and "config.json" in message and "overwrite=True" in message
    assert tree_snapshot(tmp_path) == before


def test_overwrite_into_a_foreign_directory_replaces_only_same_names(tmp_path):
    """A plain PEFT save (no manifest of ours) with notes beside it: the same-named files are replaced, with a
    warning naming them, and the notes stay."""
    target = tmp_path / "peft_dir"
    _adapted(seed=3).save_pretrained(str(target))
    (target / "notes.md").write_text("keep me")
    model = _adapted(seed=4)
    with pytest.warns(UserWarning, match=r"adapter_config\.json.*adapter_model\.safetensors"):
        jl.save(model, target, overwrite=True)
    assert (target / "notes.md").read_text() == "keep me"
    loaded = jl.load(tiny_model("llama"), target)
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5)


def test_a_file_edited_after_the_save_is_not_replaced_silently(tmp_path):
    target = tmp_path / "run1"
    jl.save(_adapted(), target)
    (target / "README.md").write_text((target / "README.md").read_text() + "\nMy notes on this run.\n")
    before = tree_snapshot(tmp_path)
    with pytest.raises(UsageError, match=r"README\.md changed after the last save.*overwrite=True"):
        jl.save(_adapted(seed=2), target)
    assert tree_snapshot(tmp_path) == before
    with pytest.warns(UserWarning, match="README.md"):
        jl.save(_adapted(seed=2), target, overwrite=True)
    assert "My notes" not in (target / "README.md").read_text()


def test_overwrite_must_be_a_bool(tmp_path):
    with pytest.raises(UsageError, match=r"`overwrite` must be True or False, got 'yes'"):
        jl.save(_adapted(), tmp_path / "a", overwrite="yes")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------- atomic with user files


def _partial_then(exc: BaseException):
    def write(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 100)  # a torn file, as a full disk leaves
        raise exc

    return write


def test_failing_save_keeps_previous_save_and_user_files(tmp_path, monkeypatch):
    target = tmp_path / "run1"
    jl.save(_adapted(), target)
    _user_files(target)
    before = tree_snapshot(tmp_path)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", _partial_then(RuntimeError("forced failure")))
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.save(_adapted(seed=2), target)
    assert tree_snapshot(tmp_path) == before
    assert _leftovers(tmp_path) == []


def test_failing_install_keeps_previous_save_and_user_files(tmp_path, monkeypatch):
    """No RENAME_EXCHANGE, and the rename that puts the new save in place fails: all comes back as it was."""
    target = tmp_path / "run1"
    jl.save(_adapted(), target)
    _user_files(target)
    before = tree_snapshot(tmp_path)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == target and ".saving-" in Path(src).name:
            raise RuntimeError("forced failure in rename")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(RuntimeError, match="forced failure"):
        jl.save(_adapted(seed=2), target)
    monkeypatch.undo()
    assert tree_snapshot(tmp_path) == before
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------- modes


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_002")
def test_saved_directories_honour_the_umask(tmp_path):
    assert _mode(jl.save(_adapted(), tmp_path / "adapter")) == 0o775
    assert _mode(jl.save(_adapted(), tmp_path / "merged", merged=True)) == 0o775
    model = jl.inject(tiny_model("llama"), r=4, name="chat")
    assert _mode(jl.save(model, tmp_path / "named")) == 0o775
    job = tmp_path / "job"  # what an export writes through
    stage = files.stage_dir(job)
    (stage / "train.py").write_text("print('hi')\n")
    files.install_staged(stage, job)
    assert _mode(job) == 0o775


@pytest.mark.usefixtures("umask_002")
@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_resave_keeps_the_directory_mode(tmp_path, merged):
    target = tmp_path / "shared"
    jl.save(_adapted(), target, merged=merged)
    os.chmod(target, 0o750)
    jl.save(_adapted(seed=2), target, merged=merged)
    assert _mode(target) == 0o750


# ----------------------------------------------------------------------------------------------- killed saves

_BLOCKED_SAVE = textwrap.dedent(
    """
    import os, sys, time
    import peft.peft_model
    import jupyter_lora as jl
    from jupyter_lora.core.adapters import files
    from jupyter_lora.testing import tiny_model

    target, where = sys.argv[1], sys.argv[2]
    model = jl.inject(tiny_model("llama"), r=4, targets="v_proj")

    def block():
        print("blocked", flush=True)
        time.sleep(600)

    if where == "write":  # half-way through writing the weights
        def write(tensors, filename, *args, **kwargs):
            open(filename, "wb").write(bytes(100))
            block()
        peft.peft_model.safe_save_file = write
    else:  # between the two renames used where a directory cannot be swapped in one step
        files._exchange = lambda a, b: False
        rename = os.rename
        def renaming(src, dst):
            if os.path.basename(dst) == os.path.basename(target) and ".saving-" in os.path.basename(src):
                block()
            return rename(src, dst)
        os.rename = renaming
    jl.save(model, target)
    """
)


def _start_blocked_save(target: Path, where: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_SAVE, str(target), where],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    return proc


def _wait_blocked(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "blocked", f"the save in the child process did not start (exit {proc.poll()})"


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    proc.stdout.close()


@pytest.mark.slow
def test_killed_save_leaves_previous_save_and_next_save_cleans_up(tmp_path):
    target = tmp_path / "run1"
    jl.save(_adapted(), target)
    saved = tree_snapshot(target)
    killed, live = _start_blocked_save(target, "write"), _start_blocked_save(target, "write")
    try:
        _wait_blocked(killed)
        _wait_blocked(live)
        _kill(killed)
        assert tree_snapshot(target) == saved
        assert len(_leftovers(tmp_path)) == 2
        model = _adapted(seed=2)
        jl.save(model, target)
        # the killed save's staging directory is gone; the live save's is left alone
        assert len(_leftovers(tmp_path)) == 1
    finally:
        _kill(live)
    jl.save(model, target)
    assert _leftovers(tmp_path) == []
    assert torch.allclose(_logits(jl.load(tiny_model("llama"), target)), _logits(model), atol=1e-5)


@pytest.mark.slow
def test_save_killed_between_two_renames_is_recovered(tmp_path):
    """Where a directory cannot be swapped in one step, a kill between moving the old save aside and moving the
    new one in leaves no directory at the path: the next save puts the old one back first."""
    target = tmp_path / "run1"
    jl.save(_adapted(), target)
    _user_files(target)
    saved = tree_snapshot(target)
    proc = _start_blocked_save(target, "rename")
    try:
        _wait_blocked(proc)
    finally:
        _kill(proc)
    assert not target.exists()
    with pytest.raises(UsageError, match="holds an adapter saved earlier"):  # the recovered save is seen
        jl.save(_adapted(), target, merged=True)
    assert tree_snapshot(target) == saved
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------- disk errors


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["oserror", "safetensors"],
)
@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_full_disk_is_a_one_line_error_and_nothing_half_written(tmp_path, monkeypatch, error, merged):
    target = tmp_path / "run1"
    jl.save(_adapted(), target, merged=merged)
    _user_files(target)
    before = tree_snapshot(tmp_path)
    owner = transformers.modeling_utils if merged else peft.peft_model
    monkeypatch.setattr(owner, "safe_save_file", _partial_then(error))
    with pytest.raises(UsageError) as exc:
        jl.save(_adapted(seed=2), target, merged=merged)
    message = _one_line(exc)
    assert f"`path` {str(target)!r}" in message
    assert "no space left on the device" in message and "Free some space" in message
    assert tree_snapshot(tmp_path) == before
    assert _leftovers(tmp_path) == []


def test_too_long_a_name_is_a_one_line_error(tmp_path):
    with pytest.raises(UsageError) as exc:
        jl.save(_adapted(), tmp_path / ("n" * 300))
    message = _one_line(exc)
    assert "300 characters" in message and "shorter name" in message
    assert os.listdir(tmp_path) == []


def test_a_long_name_within_the_limit_saves_and_resaves(tmp_path):
    target = tmp_path / ("n" * 250)
    jl.save(_adapted(), target)
    jl.save(_adapted(seed=2), target)
    assert (target / "adapter_model.safetensors").is_file()
    assert os.listdir(tmp_path) == [target.name]


def test_a_save_through_a_symlinked_directory_lands_where_it_points(tmp_path):
    storage = tmp_path / "big" / "run1"
    storage.mkdir(parents=True)
    (tmp_path / "run1").symlink_to(storage, target_is_directory=True)
    model = jl.inject(tiny_model("llama"), r=4)
    jl.save(model, tmp_path / "run1")
    jl.save(model, tmp_path / "run1")  # a re-save too
    assert (tmp_path / "run1").is_symlink() and (storage / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "run1"], "no staging directory left behind"
