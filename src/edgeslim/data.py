"""One small adapter between the user's data and every algorithm.

Any iterable works as a data source: a list of ``(x, y)`` pairs, a torch ``DataLoader``,
a generator function, numpy arrays. ``Dataset(source, transform)`` applies the user's
transform lazily, so the algorithms only ever see what they need (a batch of inputs, or
``(inputs, labels)``). Modelled on ``nncf.Dataset``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Dataset", "as_dataset"]


class Dataset(Generic[T]):
    """Wrap any re-iterable ``source``; ``transform`` maps one item to what the algorithm needs.

    >>> ds = Dataset([(1, 0), (2, 1)], transform=lambda item: item[0])
    >>> list(ds)
    [1, 2]
    """

    def __init__(self, source: Iterable[Any], transform: Callable[[Any], T] | None = None):
        if not hasattr(source, "__iter__"):
            from edgeslim.errors import ConfigError

            raise ConfigError(
                f"A Dataset source must be iterable (a list, DataLoader, generator function...). "
                f"Got {type(source).__name__} instead."
            )
        self._source = source
        self._transform = transform

    def __iter__(self) -> Iterator[T]:
        source = self._source() if callable(self._source) and not hasattr(
            self._source, "__iter__"
        ) else self._source
        for item in source:
            yield self._transform(item) if self._transform is not None else item

    def __len__(self) -> int:
        return len(self._source)  # type: ignore[arg-type]


def as_dataset(data: Any) -> Dataset[Any]:
    """Return ``data`` as a ``Dataset`` (identity when it already is one)."""
    return data if isinstance(data, Dataset) else Dataset(data)
