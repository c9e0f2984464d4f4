"""Fixtures of the notebook tests: a real kernel, always shut down."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kernel_driver import Kernel


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        yield k
    finally:
        k.stop()
