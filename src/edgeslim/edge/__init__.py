"""The edge side: run bundles (``runtime``), preprocess raw inputs (``preprocess``).

Never imports torch. ``Runner`` and ``load`` are loaded on first use, so importing
``edgeslim.edge.preprocess`` does not pull in the runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeslim.edge.runtime import Runner, load

__all__ = ["Runner", "load"]

#: the smallest request body limit a server takes (MB): about 1 kB, a small JSON request
MIN_BODY_MB = 0.001

#: seconds a server's requests in flight get to finish once shutdown begins (``drain_s``)
DRAIN_S = 10.0


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edgeslim.edge import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'edgeslim.edge' has no attribute {name!r}")
