"""Fixtures for the eval tests: held-out and calibration text."""

from __future__ import annotations

import pytest

from upcycle.testing import stdlib_corpus


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory):
    """Text the tokenizer was not trained on (the corpus fixture is the first 300 KB)."""
    f = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    f.write_text("\n\n".join(stdlib_corpus(max_bytes=20_000, skip_bytes=600_000)))
    return f


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text("\n\n".join(stdlib_corpus(max_bytes=20_000, skip_bytes=700_000)))
    return f


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see tests/conftest.py: one_thread)."""
