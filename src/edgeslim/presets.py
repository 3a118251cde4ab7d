"""Built-in recipes for ``edgeslim compress --preset NAME``.

- ``fp32``: export only (BatchNorm folded, checked against onnxruntime).
- ``int8``: accuracy-aware post-training int8 on the ONNX graph (the default).
- ``deep-compression``: after Han et al. 2016 — gradual magnitude pruning with fine-tuning
  between steps, k-means weight sharing at 5 bits, lzma entropy coding of the bundle.
"""

from __future__ import annotations

from edgeslim.errors import ConfigError
from edgeslim.recipe.core import Recipe

__all__ = ["DEFAULT_PRESET", "PRESETS", "preset_recipe"]

DEFAULT_PRESET = "int8"

PRESETS: dict[str, dict] = {
    "fp32": {"description": "export only", "steps": []},
    "int8": {
        "description": "accuracy-aware post-training int8 (fp32 fallback of sensitive layers)",
        # max_drop: ptq's default for the model's task (0.01 of top-1 agreement or accuracy,
        # 0.005 of mean cosine for sentence encoders)
        "steps": [{"ptq": {}}],
    },
    "deep-compression": {
        "description": "pruning + fine-tuning + 5-bit weight sharing + entropy coding",
        "steps": [
            {"prune": {"sparsity": 0.96, "scope": "global", "schedule": "gradual",
                       "steps": 5, "epochs": 20, "lr": 1e-3}},
            {"pack": {"bits": 5}},
        ],
    },
}


def preset_recipe(name: str) -> Recipe:
    """The recipe of preset ``name``; unknown names list the allowed ones."""
    if name not in PRESETS:
        raise ConfigError(
            f"Unknown preset {name!r}. Allowed presets: {', '.join(sorted(PRESETS))}."
        )
    return Recipe.from_dict(PRESETS[name], source=f"preset {name!r}")
