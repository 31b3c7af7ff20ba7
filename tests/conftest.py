"""Shared fixtures: the digits dataset, and one digits scenario prepared once per session
(original + oracle trained with the "tiny" recipe into a temporary cache)."""

from __future__ import annotations

import os

# Set while torch loads OpenMP (libgomp reads it once, at load): idle worker threads sleep
# instead of spinning, which keeps the 2-thread runs fast when the 2 cores are shared with
# other processes. Restored right after, so subprocesses started by tests are unaffected.
_omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.zeros(1)  # make sure the OpenMP runtime is loaded and initialised
if _omp_wait_policy is None:
    del os.environ["OMP_WAIT_POLICY"]

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
def scenario():
    from coun_tune.core.recipes import Scenario

    return Scenario(**SCENARIO_KW)


@pytest.fixture(scope="session")
def prepared(scenario, session_cache_dir, digits):
    """pipeline.prepare on digits random:0.1, seed 0, recipe "tiny", CPU, in a temp cache."""
    from coun_tune.core.pipeline import prepare

    torch.set_num_threads(2)
    return prepare(scenario, cache_dir=session_cache_dir, device="cpu", log=lambda s: None, data=digits)
