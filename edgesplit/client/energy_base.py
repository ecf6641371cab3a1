"""The energy reader interface: what every reader (measured or estimated) promises, and its one error.

Every reader has the same life: `start()`, then `read_joules()` (joules since start, any number of times),
then `stop()`. Constructing a real reader probes its sensor and raises `SensorUnavailable` (with the reason)
when the sensor is absent or unreadable.

This module is the leaf of the energy modules: `energy_readers` (the sensors) and `energy` (the estimate and
the chooser) both build on it, and it imports neither, so the three form no circle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import ClassVar, TypeVar

from edgesplit.errors import EdgesplitError

Clock = Callable[[], float]
CommandRunner = Callable[[Sequence[str]], str]

_Reader = TypeVar("_Reader", bound="EnergyReader")

MEASURED = "measured"
ESTIMATED = "estimated"


class SensorUnavailable(EdgesplitError):
    """An energy sensor is absent, unreadable (permission denied) or gave something that is not a reading."""


class EnergyReader(ABC):
    """Joules over an interval, labelled with how they were measured."""

    kind: ClassVar[str]  # the name a device profile's `energy_reader` uses

    def __init__(self) -> None:
        # Set by detect_energy_reader: "<kind>: <reason>" for each reader tried before this one, unavailable.
        self.skipped: tuple[str, ...] = ()

    @property
    @abstractmethod
    def method(self) -> str:
        """ "measured" or "estimated"."""

    @property
    @abstractmethod
    def source(self) -> str:
        """What was read: "rapl:/sys/class/powercap/intel-rapl:0", "estimate:raspberry-pi-5 profile", ..."""

    @abstractmethod
    def start(self) -> None:
        """Begin (or restart) the interval at zero joules."""

    @abstractmethod
    def read_joules(self) -> float:
        """Joules since `start()`; after `stop()`, the total at stop."""

    @abstractmethod
    def stop(self) -> None:
        """End the interval and release any sampling thread."""

    def __enter__(self: _Reader) -> _Reader:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} {self.source}>"
