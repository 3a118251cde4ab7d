"""edgeslim: compress neural networks, package them as signed bundles, run them at the edge.

One verb per technique, flat here (nncf-style)::

    import edgeslim
    model = edgeslim.load_model("digits-cnn")
    result = edgeslim.prune(model, sparsity=0.8, train_data=train, epochs=3)
    runner = edgeslim.load("model.eslim")            # torch-free
    outputs = runner.run({"input": x})
    with edgeslim.FleetClient("http://127.0.0.1:8700") as fleet:   # torch-free
        fleet.wait(fleet.deploy("model.eslim", canary=0.1)["id"])

Names resolve lazily, so ``import edgeslim`` (and the torch-free ``edgeslim.edge``) never
imports torch; the compression verbs import it when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_EXPORTS: dict[str, str] = {
    # data and models
    "Dataset": "edgeslim.data:Dataset",
    "load_model": "edgeslim.zoo:load_model",
    "load": "edgeslim.edge.runtime:load",
    # the fleet controller's HTTP API, from Python (torch-free)
    "FleetClient": "edgeslim.fleet.client:FleetClient",
    # the pipeline verb; plain `compress` is the subpackage of techniques (edgeslim.compress)
    "compress_model": "edgeslim.pipeline:compress",
    # compression verbs
    "prune": "edgeslim.compress.prune:prune",
    "prune_structured": "edgeslim.compress.structured:prune_structured",
    "distill": "edgeslim.compress.distill:distill",
    "quantize_qat": "edgeslim.compress.qat:quantize_qat",
    "minmax_quantize": "edgeslim.compress.quantizer:minmax_quantize",
    "level_quantize": "edgeslim.compress.quantizer:level_quantize",
    "strip_qat": "edgeslim.compress.qat:strip_qat",
    # recipes
    "Recipe": "edgeslim.recipe:Recipe",
    "Step": "edgeslim.recipe:Step",
    "load_recipe": "edgeslim.recipe:load_recipe",
    "run_recipe": "edgeslim.recipe:run_recipe",
    # errors
    "EdgeslimError": "edgeslim.errors:EdgeslimError",
    "ConfigError": "edgeslim.errors:ConfigError",
    "ModelError": "edgeslim.errors:ModelError",
    "BundleError": "edgeslim.errors:BundleError",
    "SignatureError": "edgeslim.errors:SignatureError",
    "InferenceError": "edgeslim.errors:InferenceError",
    "UnreachableError": "edgeslim.errors:UnreachableError",
    "StillRunningError": "edgeslim.errors:StillRunningError",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'edgeslim' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
