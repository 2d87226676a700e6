"""Shared test fixtures: real environments (built once, cached) and stores."""

from __future__ import annotations

import pytest

import fixtures


@pytest.fixture(scope="session")
def env_prefix():
    """``env_prefix("sklearn-dev")`` builds (or finds) a fixture environment."""
    return fixtures.build


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private artifact store, also the default through dask config."""
    import dask.config

    path = tmp_path / "store"
    with dask.config.set({"envship.store": str(path)}):
        monkeypatch.setenv("DASK_ENVSHIP__STORE", str(path))
        yield path
