"""Shared fixtures: the digits dataset, and one digits scenario prepared once per session
(original + oracle trained with the "tiny" recipe into a temporary cache)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)

SCENARIO_KW = dict(dataset="digits", forget="random:0.1", seed=0, recipe="tiny")


@pytest.fixture(scope="session")
def digits():
    from coun_tune.core.datasets import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("coun_tune_cache")


@pytest.fixture(scope="session")
def prepared(session_cache_dir, digits):
    """pipeline.prepare on digits random:0.1, seed 0, recipe "tiny", CPU, in a temp cache."""
    from coun_tune.core.pipeline import prepare
    from coun_tune.core.recipes import Scenario

    torch.set_num_threads(2)
    return prepare(Scenario(**SCENARIO_KW), cache_dir=session_cache_dir, device="cpu", log=lambda s: None, data=digits)
