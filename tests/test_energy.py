"""EnergyIntegrator: trapezoidal Wh from W, never guessing across gaps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estate.energy import EnergyIntegrator

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_first_reading_adds_nothing() -> None:
    assert EnergyIntegrator(max_gap=5.0).add(T0, 100.0) == 0.0


@given(
    power=st.floats(min_value=0, max_value=100_000, allow_nan=False),
    seconds=st.integers(min_value=1, max_value=600),
)
def test_constant_power_gives_power_times_hours(power: float, seconds: int) -> None:
    integrator = EnergyIntegrator(max_gap=5.0)
    total = sum(integrator.add(at(s), power) for s in range(seconds + 1))
    assert total == pytest.approx(power * seconds / 3600, rel=1e-9, abs=1e-12)


def test_trapezoid_between_two_powers() -> None:
    integrator = EnergyIntegrator(max_gap=5.0)
    integrator.add(at(0), 100.0)
    assert integrator.add(at(2), 200.0) == pytest.approx((100 + 200) / 2 * 2 / 3600)


def test_gap_of_exactly_max_gap_is_integrated() -> None:
    integrator = EnergyIntegrator(max_gap=5.0)
    integrator.add(at(0), 360.0)
    assert integrator.add(at(5), 360.0) == pytest.approx(0.5)


def test_gap_longer_than_max_gap_adds_nothing_then_integration_resumes() -> None:
    integrator = EnergyIntegrator(max_gap=5.0)
    integrator.add(at(0), 3600.0)
    assert integrator.add(at(1), 3600.0) == pytest.approx(1.0)
    assert integrator.add(at(60), 3600.0) == 0.0
    assert integrator.add(at(61), 3600.0) == pytest.approx(1.0)


def test_older_timestamp_adds_nothing_and_is_not_a_new_origin() -> None:
    integrator = EnergyIntegrator(max_gap=5.0)
    integrator.add(at(10), 3600.0)
    assert integrator.add(at(8), 3600.0) == 0.0
    assert integrator.add(at(11), 3600.0) == pytest.approx(1.0)


def test_same_timestamp_adds_nothing() -> None:
    integrator = EnergyIntegrator(max_gap=5.0)
    integrator.add(at(1), 3600.0)
    assert integrator.add(at(1), 3600.0) == 0.0


def test_reset_forgets_the_previous_reading() -> None:
    integrator = EnergyIntegrator(max_gap=5.0)
    integrator.add(at(0), 3600.0)
    integrator.reset()
    assert integrator.add(at(1), 3600.0) == 0.0
    assert integrator.add(at(2), 3600.0) == pytest.approx(1.0)
