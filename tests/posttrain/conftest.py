"""Fixtures for the recipe tests."""

from __future__ import annotations

import pytest

from tests.helpers import single_thread

# Every recipe test runs its hidden-32 models on one thread (see `single_thread`).
one_thread = pytest.fixture(autouse=True, scope="package", name="one_thread")(single_thread)
