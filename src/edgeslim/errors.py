"""Typed exceptions, one module for the whole package.

Every error raised on bad user input is an ``EdgeslimError`` subclass whose message names
the bad value, what is allowed and, where there is one, the fix. The CLI maps these to exit
codes and prints the message without a traceback; the HTTP layer maps them to V2 error JSON.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConfigError",
    "EdgeslimError",
    "InferenceError",
    "MissingDependencyError",
    "ModelError",
    "SignatureError",
    "StillRunningError",
    "UnreachableError",
]


class EdgeslimError(Exception):
    """Base class of every error edgeslim raises on purpose."""

    exit_code = 2


class ConfigError(EdgeslimError, ValueError):
    """A parameter, recipe or preset is outside what is allowed."""


class ModelError(EdgeslimError, TypeError):
    """Something given as a model is not one, or does not fit the operation."""


class MissingDependencyError(EdgeslimError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class BundleError(EdgeslimError):
    """A .eslim bundle is malformed, truncated, hostile or inconsistent."""


class SignatureError(BundleError):
    """A bundle's signature is missing or does not verify against the public key."""

    exit_code = 4


class InferenceError(EdgeslimError, ValueError):
    """Inputs given to a model do not match its declared inputs."""


class UnreachableError(EdgeslimError):
    """A service edgeslim talks to (the fleet controller) did not answer: exit code 5."""

    exit_code = 5


class StillRunningError(EdgeslimError):
    """A wait ran out before the work it waited for ended (which goes on): exit code 3."""

    exit_code = 3


def require(module: str, extra: str, purpose: str) -> None:
    """Raise ``MissingDependencyError`` naming the extra when ``module`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed. "
            f"Install it with: pip install 'edgeslim[{extra}]'"
        )
