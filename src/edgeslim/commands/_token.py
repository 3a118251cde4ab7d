"""``--token``, as every verb that takes one reads it (``serve``, ``fleet controller|node``,
the fleet's operator verbs): the flag or an environment variable, checked by the token rule
of the servers (``edgeslim.edge.auth``)."""

from __future__ import annotations

import os
from typing import Any

import typer

from edgeslim.edge.auth import TOKEN_RULE, token_problem
from edgeslim.errors import ConfigError


def token_option(env: str, text: str) -> Any:
    """The ``--token`` option, read from ``env`` when the flag is not given."""
    return typer.Option(None, "--token", envvar=env, show_envvar=True, help=text)


def read_token(token: str | None, env: str, unset: str) -> str | None:
    """``--token`` (or ``env``) checked; None when neither is set. An empty one is refused,
    not read as no token (a secret that did not arrive must not turn auth off, nor go
    unsent); ``unset`` says what setting neither does ("to serve without auth")."""
    if token is None and os.environ.get(env) == "":
        token = ""  # click reads an empty variable as unset
    if token is None:
        return None
    if not token.strip():
        raise ConfigError(f"--token (or {env}) is empty; give a token, or set neither {unset}.")
    problem = token_problem(token)
    if problem is not None:  # the value is a secret: described, never shown
        raise ConfigError(f"--token (or {env}) must be {TOKEN_RULE}. Got {problem}.")
    return token
