"""Recipes: an ordered list of compression steps, from YAML or built as Python objects.

A recipe file::

    name: digits-cnn-slim            # optional; the bundle's model name
    data: digits                     # optional for zoo models: their own data is used;
                                     # or package.module:callable returning a Workload
    steps:
      - prune: {sparsity: 0.8, scope: global, epochs: 3}
      - quantize: {bits: 8, epochs: 2}

Every step name and every key is checked against the step registry before any work starts,
so a typo fails in milliseconds with the allowed names, not after an hour of fine-tuning.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslim._validate import load_yaml, yaml_error_line
from edgeslim.errors import ConfigError

__all__ = ["Recipe", "Step", "load_recipe"]

_TOP_KEYS = {"name", "data", "steps", "description"}


def _suggest(word: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, allowed, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclass
class Step:
    """One step: ``name`` from the registry (``edgeslim.recipe.steps.STEPS``) and its params."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self, index: int = 0) -> None:
        """Check the name, the keys and (cheaply) the values. Raises ``ConfigError``."""
        from edgeslim.recipe.steps import STEPS

        where = f"step {index + 1} ({self.name!r})"
        if self.name not in STEPS:
            raise ConfigError(
                f"Unknown recipe step {self.name!r} at step {index + 1}. Allowed steps: "
                f"{', '.join(sorted(STEPS))}.{_suggest(self.name, sorted(STEPS))}"
            )
        if not isinstance(self.params, Mapping):
            raise ConfigError(
                f"The parameters of {where} must be a mapping of key: value. "
                f"Got {type(self.params).__name__} instead."
            )
        spec = STEPS[self.name]
        allowed = spec.keys()
        for key in self.params:
            if key not in allowed:
                raise ConfigError(
                    f"Unknown key {key!r} in {where}. Allowed keys: "
                    f"{', '.join(sorted(allowed)) or '(none)'}."
                    f"{_suggest(str(key), sorted(allowed))}"
                )
        if spec.check is not None:
            try:
                spec.check(**self.params)
            except ConfigError as exc:
                raise ConfigError(f"In {where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {self.name: dict(self.params)}


@dataclass
class Recipe:
    """An ordered list of ``Step``s, plus an optional model name and data source."""

    steps: list[Step]
    name: str | None = None
    data: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        self.steps = [
            s if isinstance(s, Step) else _step_from(s, i) for i, s in enumerate(self.steps)
        ]
        self.validate()

    def validate(self) -> None:
        from edgeslim.bundle.manifest import NAME_RE, NAME_RULE
        from edgeslim.recipe.steps import STEPS

        if self.name is not None and (not isinstance(self.name, str)
                                      or not NAME_RE.fullmatch(self.name)):
            raise ConfigError(f"The recipe's 'name' (the model name in the manifest) must be "
                              f"{NAME_RULE}. Got {self.name!r} instead.")
        if self.data is not None:
            from edgeslim.recipe.workload import check_data

            check_data(self.data, "data", "the recipe")
        seen_onnx = None
        ptq_at = None
        for i, step in enumerate(self.steps):
            step.validate(i)
            if step.name == "ptq" and ptq_at is not None:
                raise ConfigError(
                    f"Step {i + 1} ('ptq') repeats step {ptq_at + 1} ('ptq'): the model is "
                    "already quantized by then. Give one ptq step.")
            if step.name == "ptq":
                ptq_at = i
            if STEPS[step.name].stage == "onnx":
                seen_onnx = step.name
            elif seen_onnx is not None:
                raise ConfigError(
                    f"Step {i + 1} ({step.name!r}) trains the torch model, but it comes after "
                    f"{seen_onnx!r}, which works on the exported ONNX graph. List every torch "
                    "step (prune, prune_structured, distill, quantize, finetune) first."
                )

    @property
    def torch_steps(self) -> list[Step]:
        from edgeslim.recipe.steps import STEPS

        return [s for s in self.steps if STEPS[s.name].stage == "torch"]

    @property
    def onnx_steps(self) -> list[Step]:
        from edgeslim.recipe.steps import STEPS

        return [s for s in self.steps if STEPS[s.name].stage == "onnx"]

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "recipe") -> Recipe:
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"The {source} must be a mapping with a 'steps:' list. "
                f"Got {type(raw).__name__} instead."
            )
        for key in raw:
            if key not in _TOP_KEYS:
                raise ConfigError(
                    f"Unknown top-level key {key!r} in the {source}. Allowed keys: "
                    f"{', '.join(sorted(_TOP_KEYS))}.{_suggest(str(key), sorted(_TOP_KEYS))}"
                )
        steps = raw.get("steps")
        if not isinstance(steps, list):
            raise ConfigError(
                f"The 'steps' of the {source} must be a list of steps. Got {steps!r} instead."
            )
        return cls(
            steps=[_step_from(s, i) for i, s in enumerate(steps)],
            name=raw.get("name"),
            data=raw.get("data"),
            description=raw.get("description"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": [s.to_dict() for s in self.steps]}
        for key in ("name", "data", "description"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _step_from(raw: Any, index: int) -> Step:
    if isinstance(raw, str):
        return Step(raw, {})
    if isinstance(raw, Mapping) and len(raw) == 1:
        (name, params), = raw.items()
        if params is None:  # "- ptq:" with nothing after it: the step's defaults
            params = {}
        return Step(str(name), dict(params) if isinstance(params, Mapping) else params)
    raise ConfigError(
        f"Step {index + 1} must be a step name or a one-key mapping like "
        f"'prune: {{sparsity: 0.8}}'. Got {raw!r} instead."
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a YAML (or JSON) file; presets are ``edgeslim.presets.preset_recipe``."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"The recipe {str(path)!r} is a folder; give a YAML file.")
    if not p.is_file():
        raise ConfigError(f"The recipe file {str(path)!r} does not exist.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"The recipe file {str(path)!r} is not text (not UTF-8); a recipe is "
                          "a YAML file.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read the recipe file {str(path)!r}: {exc.strerror}.") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"The recipe file {str(path)!r} is not valid YAML: "
                          f"{yaml_error_line(exc)}.") from None
    return Recipe.from_dict(raw, source=f"recipe file {str(path)!r}")
