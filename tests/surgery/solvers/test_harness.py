"""The solver harness (slow): every solve of ``harness.py`` gives the objective and the factors' bytes it
gave when ``harness_objectives.json`` was written, to the bit. Written with one thread, checked with one."""

from __future__ import annotations

import json

import pytest
import torch

from tests.surgery.solvers.harness import RESULTS, cases, solve_case

EXPECTED = json.loads(RESULTS.read_text())


def test_the_file_covers_every_case():
    assert set(EXPECTED) == set(cases())
    assert len(EXPECTED) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_solve_is_bit_identical(name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = solve_case(name)
    finally:
        torch.set_num_threads(threads)
    assert got == EXPECTED[name], (name, float.fromhex(got["objective"]), float.fromhex(EXPECTED[name]["objective"]))
