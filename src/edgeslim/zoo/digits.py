"""The two built-in digits models, trained in seconds on scikit-learn's bundled digits.

Split (DESIGN.md): ``train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)`` on
the 1797 8x8 images, pixels divided by 16 so they lie in [0, 1].
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "DigitsCNN",
    "DigitsMLP",
    "DigitsSplit",
    "digits_loaders",
    "load_digits_split",
    "pretrained_digits",
]


@dataclass(frozen=True)
class DigitsSplit:
    """Train/test arrays: ``x_*`` float32 (N, 64) in [0, 1], ``y_*`` int64 (N,)."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


@lru_cache(maxsize=1)
def load_digits_split() -> DigitsSplit:
    """The project's fixed split of scikit-learn's digits (see module docstring)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return DigitsSplit(x_train, x_test, y_train, y_test)


def digits_loaders(
    batch_size: int = 64, *, seed: int = 0
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """``(train, test)`` DataLoaders yielding ``(x, y)`` with x of shape (B, 64)."""
    split = load_digits_split()
    train = torch.utils.data.TensorDataset(
        torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    )
    test = torch.utils.data.TensorDataset(
        torch.from_numpy(split.x_test), torch.from_numpy(split.y_test)
    )
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
        torch.utils.data.DataLoader(test, batch_size=512),
    )


class DigitsMLP(nn.Module):
    """64-300-100-10, shaped like LeNet-300-100. Input (B, 64) in [0, 1]."""

    def __init__(self, hidden: tuple[int, int] = (300, 100), num_classes: int = 10):
        super().__init__()
        h1, h2 = hidden
        self.fc1 = nn.Linear(64, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """LeNet-5-scale CNN for 8x8 digits (about 152k parameters at width 1).

    Input (B, 64) or (B, 1, 8, 8) in [0, 1]. ``width`` scales every channel count, which is
    how the distillation tests build a student a quarter of the teacher's width.
    """

    def __init__(self, width: float = 1.0, num_classes: int = 10):
        super().__init__()
        c1, c2, f = max(1, round(32 * width)), max(1, round(64 * width)), max(1, round(128 * width))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 4 * 4, f)
        self.fc2 = nn.Linear(f, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 8, 8)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.pool(self.act(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(self.act(self.fc1(x)))


_TRAIN_EPOCHS = {"digits-mlp": 40, "digits-cnn": 30}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeslim" / "zoo"


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def pretrained_digits(name: str, *, cache: bool = True) -> nn.Module:
    """Return the trained zoo model ``name`` ('digits-mlp' or 'digits-cnn') in eval mode.

    Training is deterministic (seed 0) and takes seconds; the weights are cached on disk
    under ``~/.cache/edgeslim/zoo`` keyed by this file's hash, so a change to the
    architecture or the recipe retrains.
    """
    from edgeslim.compress.train import fit

    model: nn.Module = DigitsMLP() if name == "digits-mlp" else DigitsCNN()
    path = _cache_dir() / f"{name}-{_source_hash()}.pt"
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    train, _ = digits_loaders(seed=0)
    fit(model, train, epochs=_TRAIN_EPOCHS[name], lr=3e-3, desc=f"training {name}")
    model.eval()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return model


def _digits_mlp() -> nn.Module:
    return pretrained_digits("digits-mlp")


def _digits_cnn() -> nn.Module:
    return pretrained_digits("digits-cnn")
