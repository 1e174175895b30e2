"""The message for a device count that does not split the particles names counts that do."""

import pytest

from pes.runs.config import _even_split_hint


@pytest.mark.parametrize("units, devices, per_unit, counts, device_counts", [
    (50, 4, 2, (96, 104), (2, 5)),   # toy regression's 100 particles on 4 devices
    (3, 4, 2, (8,), (3,)),           # 6 particles: 3 pairs
    (7, 3, 1, (6, 9), (1, 7)),       # 7 particles of an estimator without pairs
])
def test_hint_names_counts_that_divide(units, devices, per_unit, counts, device_counts):
    hint = _even_split_hint(units, devices, per_unit)
    assert hint == (f"use num_particles={' or '.join(map(str, counts))}, or devices="
                    f"{' or '.join(map(str, device_counts))}")
    for n in counts:
        assert n % (devices * per_unit) == 0
    for d in device_counts:
        assert units % d == 0
