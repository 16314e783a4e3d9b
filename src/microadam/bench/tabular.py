"""scikit-learn's bundled data sets (no download) as tensors, and the small models for them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "TABULAR_DATASETS",
    "EpochBatches",
    "TabularData",
    "load_arrays",
    "load_tabular",
    "mlp",
    "standardized",
]

# name -> scikit-learn loader; all three ship inside scikit-learn's wheel.
TABULAR_DATASETS = {
    "iris": "load_iris",
    "breast-cancer": "load_breast_cancer",
    "digits": "load_digits",
}


@dataclass(frozen=True)
class TabularData:
    """A held-out split of one data set, as float32 features and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    standardized: bool

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_val]).max()) + 1


def load_arrays(name: str) -> tuple[Any, Any]:
    """The features and labels of ``iris``, ``breast-cancer`` or ``digits`` as scikit-learn
    returns them (NumPy arrays, float64 and int64)."""
    if name not in TABULAR_DATASETS:
        raise ValueError(
            f"Invalid data set: {name!r} (expected one of {', '.join(TABULAR_DATASETS)})"
        )
    try:
        import sklearn.datasets
    except ImportError as err:  # pragma: no cover - exercised only without scikit-learn
        raise RuntimeError(
            f"The {name!r} workload needs scikit-learn: pip install 'microadam[data]'"
        ) from err
    return getattr(sklearn.datasets, TABULAR_DATASETS[name])(return_X_y=True)


def standardized(reference: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``xs`` centred and scaled by ``reference``'s per-feature mean and standard
    deviation (a constant feature is only centred)."""
    mean, std = reference.mean(0), reference.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((x - mean) / std for x in xs)


def load_tabular(
    name: str, val_fraction: float = 0.2, standardize: bool = True, split_seed: int = 0
) -> TabularData:
    """Load ``iris``, ``breast-cancer`` or ``digits`` with a stratified held-out split.

    The split depends only on ``split_seed`` (not on the training seed), so every optimizer
    and every seed is scored on the same held-out samples. With ``standardize`` the features
    are centred and scaled with the training part's mean and standard deviation (constant
    features, such as digits' blank corner pixels, are only centred).
    """
    x, y = load_arrays(name)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction} (expected 0 < val_fraction < 1)")
    from sklearn.model_selection import train_test_split

    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=val_fraction, random_state=split_seed, stratify=y
    )
    x_tr = torch.tensor(x_tr, dtype=torch.float64)
    x_va = torch.tensor(x_va, dtype=torch.float64)
    if standardize:
        x_tr, x_va = standardized(x_tr, x_tr, x_va)
    return TabularData(
        name=name,
        x_train=x_tr.float(),
        y_train=torch.tensor(y_tr, dtype=torch.int64),
        x_val=x_va.float(),
        y_val=torch.tensor(y_va, dtype=torch.int64),
        standardized=standardize,
    )


class EpochBatches:
    """Indices of mini-batches of ``batch_size`` (at most ``n``) out of ``n`` samples: each
    epoch a fresh permutation drawn from ``generator``; a short last batch is dropped."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self.perm, self.pos = torch.randperm(n, generator=generator), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


def mlp(sizes: list[int] | tuple[int, ...]) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` through ``sizes`` (two sizes: one linear layer).

    Initialized by ``nn.Linear``'s default, so ``torch.manual_seed`` fixes the weights.
    """
    if len(sizes) < 2:
        raise ValueError(f"Invalid sizes: {sizes} (expected at least input and output sizes)")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)
