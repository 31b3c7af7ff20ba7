"""Scenarios and training recipes: everything that determines the original and the oracle.

A `Scenario` names a dataset, a forget spec and a seed; the architecture and the recipe of the
original/oracle default per dataset. The paper's recipe (182 epochs, batch 256, SGD 0.1,
x0.1 at 50% and 75%) is available for CIFAR; digits and Fashion-MNIST get smaller recipes that
still make the original memorize its training data (train accuracy >= 99%): without that the
original's gaps to the oracle are noise and there is nothing to unlearn (METHOD.md section 5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from coun_tune.errors import UsageError


@dataclass(frozen=True)
class TrainRecipe:
    """How the original (on D) and the oracle (on D_r) are trained from scratch: SGD with
    momentum, step decay by `gamma` at the given fractions of `epochs`, CHN augmentation."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict[str, TrainRecipe] = {
    "paper": TrainRecipe(epochs=182, batch_size=256, lr=0.1),
    # digits: 1437 train images; 40 epochs of the small CNN reach 100% train accuracy in ~7 s
    # on one CPU thread. Digits is easy: the oracle's forget accuracy is ~98-99.5%, so the
    # original's forget_gap at 10% is about one sample; random:0.5 leaves a clearer gap.
    "digits": TrainRecipe(epochs=40, batch_size=64, lr=0.05),
    # Fashion-MNIST (with resnet18, see DATASET_DEFAULTS): 60 epochs with crop+flip, so the
    # original memorizes D under the augmentation unlearning uses; a GPU job (CPU: hours per
    # epoch). Measurements and the check command: docs/fashion_mnist_recipe.md
    "fashion_mnist": TrainRecipe(epochs=60, batch_size=256, lr=0.1),
    # for tests: a recipe that trains in a couple of seconds
    "tiny": TrainRecipe(epochs=8, batch_size=64, lr=0.05),
}


@dataclass(frozen=True)
class DatasetDefaults:
    arch: str
    recipe: str
    batch_size: int  # unlearning batch size (the paper's 256 on CIFAR)


DATASET_DEFAULTS: dict[str, DatasetDefaults] = {
    "digits": DatasetDefaults("small_cnn", "digits", 64),
    # not small_cnn: its 24k parameters do not memorize 60k augmented images (METHOD.md section 5:
    # RA 93.5 / TA 92.1 after 15 epochs); ResNet-18 (CIFAR stem) is the paper's model
    "fashion_mnist": DatasetDefaults("resnet18", "fashion_mnist", 256),
    "cifar10": DatasetDefaults("resnet18", "paper", 256),
    "cifar100": DatasetDefaults("resnet18", "paper", 256),
    "tinyimagenet": DatasetDefaults("resnet18", "paper", 256),
}


@dataclass(frozen=True)
class Scenario:
    """The calibration scenario: dataset, forget spec, seed, and how theta_o / theta_r are made.

    `seed` draws the forget set and initialises both base models; `data_root` says where the
    dataset's files are (None: the dataset's default root)."""

    dataset: str = "digits"
    forget: str | tuple[str, ...] = "random:0.1"  # a tuple: sequential requests, applied in turn
    seed: int = 0
    arch: str | None = None
    recipe: str | None = None
    data_root: str | None = None
    # Draws the forget set when given (default: `seed`). Held-out forget sets for a transfer
    # check vary it and keep `seed`, so the original (the deployed model) stays the same.
    split_seed: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def forget_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def with_split(self, split_seed: int) -> Scenario:
        """This scenario with the forget set drawn by `split_seed` (the same original: `seed` is
        kept). Itself when that is already its forget seed, so the default calibration split
        keeps the scenario's identity (to_dict, exported configs) unchanged."""
        from dataclasses import replace

        return self if split_seed == self.forget_seed else replace(self, split_seed=split_seed)

    @property
    def defaults(self) -> DatasetDefaults:
        if self.dataset not in DATASET_DEFAULTS:
            raise UsageError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(sorted(DATASET_DEFAULTS))}")
        return DATASET_DEFAULTS[self.dataset]

    @property
    def sequential(self) -> bool:
        return isinstance(self.forget, tuple)

    @property
    def arch_name(self) -> str:
        return self.arch or self.defaults.arch

    @property
    def recipe_name(self) -> str:
        return self.recipe or self.defaults.recipe

    @property
    def train_recipe(self) -> TrainRecipe:
        if self.recipe_name not in RECIPES:
            raise UsageError(f"unknown recipe {self.recipe_name!r}; choose one of {', '.join(sorted(RECIPES))}")
        return RECIPES[self.recipe_name]

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "forget": list(self.forget) if self.sequential else self.forget,
            "seed": self.seed,
            "arch": self.arch_name,
            "recipe": self.recipe_name,
            "data_root": self.data_root,
            **({} if self.split_seed is None else {"split_seed": self.split_seed}),
        }
