"""What the accelerator is doing during a run: memory allocated, its peak, the device's capacity and (with
nvidia-ml-py installed) the GPU's utilisation. ``RunCallback`` reads it on logging steps, at most every
``STATS_INTERVAL`` seconds, and puts the numbers on its step events; on a CPU there is nothing to read.

Every figure comes from torch's own counters: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` read the
caching allocator's bookkeeping on the host (no device synchronisation), the capacity is read once from the
device's properties, and ``torch.cuda.utilization`` asks NVML (the ``pynvml`` module of nvidia-ml-py) — left out,
without an error, when that is not installed or the driver does not answer.

The source is replaceable (``set_provider``), so that the displays can be exercised without a GPU: a provider
factory takes the run's ``torch.device`` and returns an object with ``read()`` -> ``DeviceStats`` and
``reset_peak()``, or None where it has nothing to report.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "STATS_INTERVAL",
    "CudaStats",
    "DeviceStats",
    "StatsProvider",
    "StatsSampler",
    "cuda_provider",
    "provider_for",
    "set_provider",
]

STATS_INTERVAL = 0.2  # seconds between two reads: the progress display's own refresh interval


@dataclass(frozen=True)
class DeviceStats:
    """One reading. Bytes; ``capacity`` the device's total memory; ``utilization`` percent, None when unknown."""

    allocated: int
    peak: int
    capacity: int | None = None
    utilization: float | None = None

    def as_event(self) -> dict[str, Any]:
        """The fields a step event carries."""
        return {"memory_allocated": self.allocated, "memory_peak": self.peak,
                "memory_capacity": self.capacity, "gpu_utilization": self.utilization}  # fmt: skip


class StatsProvider(Protocol):
    def read(self) -> DeviceStats: ...

    def reset_peak(self) -> None: ...


def _nvml_available() -> bool:
    return importlib.util.find_spec("pynvml") is not None


class CudaStats:
    """The real source: torch.cuda's allocator counters for ``device``, and NVML's utilisation when it answers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.capacity = int(torch.cuda.get_device_properties(device).total_memory)
        self._utilization = _nvml_available()  # switched off for good at the first failure

    def read(self) -> DeviceStats:
        return DeviceStats(
            allocated=int(torch.cuda.memory_allocated(self.device)),
            peak=int(torch.cuda.max_memory_allocated(self.device)),
            capacity=self.capacity,
            utilization=self._read_utilization(),
        )

    def _read_utilization(self) -> float | None:
        if not self._utilization:
            return None
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # no NVML library, a driver that does not answer, a device NVML cannot see
            self._utilization = False
            return None

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


def cuda_provider(device: torch.device) -> CudaStats | None:
    """The default factory: ``CudaStats`` for a CUDA device, None for anything else."""
    return CudaStats(device) if device.type == "cuda" else None


_factory: Callable[[torch.device], StatsProvider | None] = cuda_provider


def set_provider(
    factory: Callable[[torch.device], StatsProvider | None] | None,
) -> Callable[[torch.device], StatsProvider | None]:
    """Make ``factory`` the source of device statistics for runs started from now on (None: the default,
    ``cuda_provider``). Returns the factory it replaces, so that it can be put back."""
    global _factory
    previous = _factory
    _factory = cuda_provider if factory is None else factory
    return previous


def provider_for(device: torch.device | None) -> StatsProvider | None:
    """The statistics source for a run on ``device`` (None: nothing to report, e.g. on a CPU)."""
    return None if device is None else _factory(device)


class StatsSampler:
    """Reads ``provider`` at most every ``interval`` seconds; ``sample()`` returns the event fields of a new
    reading, or {} when the last one is too recent."""

    def __init__(
        self,
        provider: StatsProvider,
        interval: float = STATS_INTERVAL,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.provider = provider
        self.interval = interval
        self._clock = clock
        self._last = -float("inf")
        self.latest: DeviceStats | None = None

    def sample(self, force: bool = False) -> dict[str, Any]:
        now = self._clock()
        if not force and now - self._last < self.interval:
            return {}
        self._last = now
        self.latest = self.provider.read()
        return self.latest.as_event()
