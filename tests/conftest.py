"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
from short_demo import ShortDemo, run_short_demo


@pytest.fixture(scope="session")
def short_demo(tmp_path_factory) -> ShortDemo:
    """The shortened `vlp demo`, run once: tests/test_demo.py checks the run itself, and the curation evidence test
    embeds its planted pairs with the model it trained (training is the costly part of both; one model serves both)."""
    return run_short_demo(tmp_path_factory.mktemp("short-demo"))
