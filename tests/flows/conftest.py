"""Fixtures of the flow tests."""

from __future__ import annotations

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="module")
def harness():
    """A temporary Prefect API and database for one test module."""
    with prefect_test_harness(server_startup_timeout=90):
        yield
