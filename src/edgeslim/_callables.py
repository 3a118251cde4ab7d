"""``package.module:callable``: a user's own code named by a string.

MODEL (``edgeslim compress pkg.mod:make_model``) and the data a recipe or ``optimize`` names
(``data: pkg.mod:make_workload``) take this form; both resolve it here, so both follow the
same rules and fail alike: a spec that is not of the form, a module that does not import, a
missing or uncallable attribute, or a callable that raises, each give one line naming the
spec and what is allowed (``accepted``), as the caller's error class (the cause stays
chained for Python users; the CLI prints the line only). No torch here: checking the form
is cheap enough for the moment a recipe is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from edgeslim.errors import EdgeslimError

__all__ = ["call_spec", "import_callable", "is_callable_spec"]


def is_callable_spec(value: Any) -> bool:
    """True for ``'package.module:callable'``: dotted identifiers, a colon, an identifier."""
    if not isinstance(value, str) or value.count(":") != 1:
        return False
    module_name, attr = value.split(":")
    return attr.isidentifier() and all(p.isidentifier() for p in module_name.split("."))


def first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def import_callable(spec: Any, *, accepted: str,
                    error: type[EdgeslimError]) -> Callable[..., Any]:
    """The callable ``spec`` names, imported; ``error`` (one line naming ``spec`` and
    ``accepted``) when it cannot be."""
    if not is_callable_spec(spec):
        raise error(f"{spec!r} is not of the form 'package.module:callable'. "
                    f"Expected {accepted}.")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raised as it ran
        raise error(f"Cannot import module {module_name!r} from {spec!r}: {first_line(exc)}. "
                    f"Expected {accepted}.") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise error(f"{module_name!r} has no callable {attr!r} (from {spec!r}). "
                    f"Expected {accepted}.")
    return factory  # type: ignore[no-any-return]


def call_spec(spec: str, factory: Callable[..., Any], *args: Any, accepted: str,
              error: type[EdgeslimError]) -> Any:
    """``factory(*args)``; ``error`` (one line naming ``spec``) when it raises."""
    try:
        return factory(*args)
    except Exception as exc:  # whatever the user's code raises
        raise error(f"{spec!r} raised {first_line(exc)}. Expected {accepted}.") from exc
