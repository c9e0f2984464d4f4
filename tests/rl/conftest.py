"""Fixtures of the RL tests: a tiny char-level Llama shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradient_nb.testing.tinymodel import tiny_char_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_char_model(tmp_path_factory.mktemp("rl") / "tiny")
