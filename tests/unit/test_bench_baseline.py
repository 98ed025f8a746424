"""The CPU regression check's baseline names the simulated switch it was measured with:
the check's yardstick. A changed switch moves the ratio as a changed proxy would."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import regression


def test_the_recorded_baseline_was_measured_with_this_simulated_switch() -> None:
    assert regression.recorded() > 0  # StaleBaseline: record it again (see the message)


def test_a_changed_simulated_switch_makes_the_baseline_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    changed = tmp_path / "sim_switch.py"
    changed.write_bytes(regression.YARDSTICK.read_bytes() + b"\n# cheaper now\n")
    monkeypatch.setattr(regression, "YARDSTICK", changed)
    with pytest.raises(regression.StaleBaseline, match="--record"):
        regression.recorded()
    assert regression.main([]) == 2  # refused before anything is measured
