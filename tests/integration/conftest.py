"""What the integration tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def deployment(tmp_path):
    """A Flower deployment on 127.0.0.1 whose every process is ended by its PID when the test ends, passed or not."""
    from .flower_deploy import Deployment

    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.end()
