"""Shared fixtures and hypothesis profiles.

Hypothesis loads its built-in ``ci`` profile when ``CI`` is set (no deadline, derandomized); the
``dev`` profile used otherwise keeps runs short.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("dev", max_examples=25, deadline=None)
if not os.environ.get("CI"):
    settings.load_profile("dev")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
