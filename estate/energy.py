"""Energy from power readings: trapezoidal integration that skips long gaps."""

from __future__ import annotations

from datetime import datetime

import attrs

__all__ = ["EnergyIntegrator"]


@attrs.define
class EnergyIntegrator:
    """Integrates power (W) over time into energy (Wh), one reading at a time.

    A gap longer than `max_gap` seconds (the board was away) or a reading older
    than the previous one contributes nothing: energy is never guessed.
    """

    max_gap: float
    _last_time: datetime | None = None
    _last_power: float = 0.0

    def add(self, at: datetime, power: float) -> float:
        """Energy in Wh between the previous reading and this one."""
        previous, previous_power = self._last_time, self._last_power
        if previous is not None and at < previous:
            return 0.0
        self._last_time, self._last_power = at, power
        if previous is None:
            return 0.0
        seconds = (at - previous).total_seconds()
        if seconds > self.max_gap:
            return 0.0
        return (previous_power + power) / 2.0 * seconds / 3600.0

    def reset(self) -> None:
        """Forget the previous reading (the board went away)."""
        self._last_time, self._last_power = None, 0.0
