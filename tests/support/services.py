"""What a test does when a service or tool it needs is missing: fail in CI (``CI=true``), where a
missing service is a broken machine, and skip elsewhere with the reason (a developer's laptop)."""

from __future__ import annotations

import os
from typing import NoReturn


def missing(message: str) -> NoReturn:
    import pytest  # imported here: the support modules load outside pytest too

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
