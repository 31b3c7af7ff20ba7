"""The unlearning engine: torch + numpy + scikit-learn only (no ray, optuna or mlflow), so it
runs on a GPU box that has nothing but torch. pyarrow is imported lazily by the split registry."""

from coun_tune.core.datasets import DatasetArrays, load_dataset
from coun_tune.core.engine import DivergedError, ScenarioData, resolve_hparams, run_unlearning
from coun_tune.core.losses import contrastive_loss
from coun_tune.core.models import build_model
from coun_tune.core.recipes import Scenario
from coun_tune.core.splits import Split, materialize_split

__all__ = [
    "DatasetArrays",
    "load_dataset",
    "DivergedError",
    "ScenarioData",
    "resolve_hparams",
    "run_unlearning",
    "contrastive_loss",
    "build_model",
    "Scenario",
    "Split",
    "materialize_split",
]
