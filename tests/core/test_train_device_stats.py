"""The device figures training events carry (memory allocated / peak / capacity, GPU utilisation), from a fake GPU
statistics source on CPU runs and from torch.cuda's own counters patched in; and how a run's last checkpoint is
labelled when Stop comes late."""

from __future__ import annotations

import types

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.train import devicestats
from jupyter_lora.core.train.callback import RunCallback
from jupyter_lora.testing import FakeGpuStats, fake_gpu_stats, tiny_model, tiny_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog."] * 16
GPU_KEYS = ("memory_allocated", "memory_peak", "memory_capacity", "gpu_utilization")
pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def of(self, kind):
        return [e for e in self.events if e.kind == kind]


def _lm():
    return jl.inject(tiny_model("llama"), r=4, targets="q_proj, v_proj")


def _train(tmp_path, observers, **settings):
    settings = {"steps": 6, "batch": 4, "lr": 1e-3, "eval": 0, **settings}
    return jl.train(_lm(), TEXT, tokenizer=tiny_tokenizer(), observers=observers, output_dir=str(tmp_path),
                    background=False, **settings)  # fmt: skip


# ----------------------------------------------------------------------------------------------- figures on events


def test_a_cpu_run_reports_no_device_figures(tmp_path):
    rec = Recorder()
    _train(tmp_path, rec)
    for event in rec.of("start") + rec.of("step"):
        if "loss" in event.data or event.kind == "start":
            assert all(event.data[k] is None for k in GPU_KEYS), event
    assert rec.of("end")[0].data["memory_peak"] is None


def test_every_logged_step_carries_the_sources_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(RunCallback, "stats_interval", 0.0)
    rec = Recorder()
    with fake_gpu_stats(capacity=40 << 30, base=1 << 30, growth=1 << 20) as fake:
        _train(tmp_path, rec)
    assert fake.resets == 1  # the peak counts from the start of the run
    start = rec.of("start")[0].data
    assert (start["memory_allocated"], start["memory_capacity"]) == (1 << 30, 40 << 30)
    logged = [e.data for e in rec.of("step") if "loss" in e.data]
    assert len(logged) == 6
    assert [d["memory_allocated"] for d in logged] == [(1 << 30) + (k % 4) * (1 << 20) for k in range(1, 7)]
    assert all(d["memory_peak"] >= d["memory_allocated"] for d in logged)
    assert {d["memory_capacity"] for d in logged} == {40 << 30}
    assert {d["gpu_utilization"] for d in logged} == {87.0}
    assert rec.of("end")[0].data["memory_peak"] == (1 << 30) + 3 * (1 << 20)
    assert devicestats.provider_for(torch.device("cpu")) is None, "the default source is back after the block"


def test_figures_are_read_at_most_every_interval(tmp_path, monkeypatch):
    # one reading at the start, then none for an hour: the steps leave the figures out instead of repeating them
    monkeypatch.setattr(RunCallback, "stats_interval", 3600.0)
    rec = Recorder()
    with fake_gpu_stats() as fake:
        _train(tmp_path, rec)
    assert fake.reads == 2  # start, and the end's peak
    logged = [e.data for e in rec.of("step") if "loss" in e.data]
    assert logged and not any(k in d for d in logged for k in GPU_KEYS)


def test_a_failing_source_is_dropped_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(RunCallback, "stats_interval", 0.0)

    class Broken(FakeGpuStats):
        def read(self):
            if self.reads >= 2:
                raise RuntimeError("driver gone")
            return super().read()

    rec = Recorder()
    broken = Broken()
    previous = devicestats.set_provider(lambda device: broken)
    try:
        run = _train(tmp_path, rec)
    finally:
        devicestats.set_provider(previous)
    assert run.state == "finished"
    logged = [e.data for e in rec.of("step") if "loss" in e.data]
    assert logged[0]["memory_allocated"] is not None
    assert all(d["memory_allocated"] is None for d in logged[1:])


# ----------------------------------------------------------------------------------------------- torch.cuda itself


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's counters replaced by recorders: what CudaStats reads, and how."""
    calls = []
    device = torch.device("cuda", 0)

    def record(name, value):
        def call(*args, **kwargs):
            calls.append((name, args))
            if isinstance(value, Exception):
                raise value
            return value

        return call

    monkeypatch.setattr(torch.cuda, "memory_allocated", record("memory_allocated", 3 << 30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", record("max_memory_allocated", 5 << 30))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", record("reset_peak_memory_stats", None))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        record("get_device_properties", types.SimpleNamespace(total_memory=141 << 30)),
    )
    monkeypatch.setattr(torch.cuda, "utilization", record("utilization", 64))
    monkeypatch.setattr(devicestats, "_nvml_available", lambda: True)
    return types.SimpleNamespace(calls=calls, device=device, monkeypatch=monkeypatch)


def test_the_default_source_on_cuda_reads_torch_cuda(fake_cuda):
    provider = devicestats.provider_for(fake_cuda.device)
    assert isinstance(provider, devicestats.CudaStats)
    provider.reset_peak()
    first, second = provider.read(), provider.read()
    assert first == devicestats.DeviceStats(3 << 30, 5 << 30, 141 << 30, 64.0) == second
    names = [name for name, _ in fake_cuda.calls]
    assert names.count("get_device_properties") == 1  # the capacity is read once
    assert names.count("utilization") == 2 and "reset_peak_memory_stats" in names
    assert all(args == (fake_cuda.device,) for _, args in fake_cuda.calls)


def test_without_nvidia_ml_py_the_utilisation_is_left_out(fake_cuda):
    fake_cuda.monkeypatch.setattr(devicestats, "_nvml_available", lambda: False)
    stats = devicestats.provider_for(fake_cuda.device).read()
    assert stats.utilization is None and stats.allocated == 3 << 30
    assert "utilization" not in [name for name, _ in fake_cuda.calls]


def test_a_utilisation_query_that_fails_is_not_asked_again(fake_cuda):
    fake_cuda.monkeypatch.setattr(
        torch.cuda, "utilization", lambda device=None: (_ for _ in ()).throw(ModuleNotFoundError("pynvml"))
    )
    provider = devicestats.provider_for(fake_cuda.device)
    assert provider.read().utilization is None
    fake_cuda.monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: pytest.fail("asked again"))
    assert provider.read().utilization is None and provider.read().allocated == 3 << 30


def test_the_sampler_waits_the_interval_between_reads():
    now = [0.0]
    sampler = devicestats.StatsSampler(FakeGpuStats(), interval=0.2, clock=lambda: now[0])
    assert sampler.sample()["memory_allocated"] == 2 << 30
    now[0] = 0.1
    assert sampler.sample() == {}
    assert sampler.sample(force=True)["memory_allocated"] == (2 << 30) + (256 << 20)
    now[0] = 0.35
    assert sampler.sample()["gpu_utilization"] == 87.0


# ----------------------------------------------------------------------------------------------- the last checkpoint


def _stop_on(model, kind, step=None):
    def observer(event):
        if event.kind == kind and (step is None or event.step == step):
            jl.last_run(model).stop(wait=False)  # the run is registered before its first event

    return observer


@pytest.mark.parametrize(
    ("kind", "step", "state", "reasons"),
    [
        ("step", 3, "stopped", ["stop"]),  # Stop mid-run: the run stopped, its checkpoint is the stop's
        ("step", 6, "finished", ["end"]),  # Stop during the last step: every step was done
        ("checkpoint", None, "finished", ["end"]),  # Stop after the last checkpoint: changed nothing
    ],
    ids=["mid-run", "last-step", "after-last-checkpoint"],
)
def test_the_last_checkpoint_is_labelled_by_how_the_run_ended(tmp_path, kind, step, state, reasons):
    rec = Recorder()
    model = _lm()
    run = jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=6, batch=4, lr=1e-3, eval=0,
                   observers=[rec, _stop_on(model, kind, step)], output_dir=str(tmp_path))  # fmt: skip
    run.wait(60)
    assert run.state == state
    assert [e.data["reason"] for e in rec.of("checkpoint")] == reasons
    assert rec.of("end")[0].data["state"] == state
    assert bool(rec.of("stop")) == (state == "stopped")
