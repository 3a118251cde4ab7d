"""Canonical input/output specs of the zoo models, and their export.

Each zoo model has fixed tensor names, dtypes and symbolic shapes that the bundle manifest
and the edge node rely on:

============================  ==========================================  =================
model                         inputs                                      outputs
============================  ==========================================  =================
digits-mlp, digits-cnn        input float32 [batch, 64]                   logits [batch, 10]
efficientnet-lite0            input float32 [batch, 3, 224, 224]          logits [batch, 1000]
minilm-l6                     input_ids, attention_mask int64             embedding float32
                              [batch, sequence]                           [batch, 384]
============================  ==========================================  =================

``zoo_io_spec(name)`` returns that spec with real example inputs (digits test images, the
``chelsea`` photo, tokenised English sentences); ``export_zoo_model`` exports a zoo model, or
a compressed model with the same interface, under that spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslim._validate import check_choice
from edgeslim.export.onnx import ExportResult, export_onnx

__all__ = ["ZOO_SPEC_NAMES", "IOSpec", "TensorSpec", "export_zoo_model", "zoo_io_spec"]

ZOO_SPEC_NAMES = ("digits-cnn", "digits-mlp", "efficientnet-lite0", "minilm-l6")

#: Sentences for the text example inputs (two lengths, so the batch needs padding).
EXAMPLE_SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "Edge devices answer requests close to where the data is produced, without a round trip.",
)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name, shape (ints or symbolic strings)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_manifest(self) -> dict[str, Any]:
        """The manifest form: ``{"name": ..., "dtype": ..., "shape": [...]}``."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class IOSpec:
    """A model's interface plus example inputs (a tuple of tensors, one per input)."""

    name: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example_inputs: tuple[Any, ...] = field(repr=False)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor name: {axis: symbol}}`` for ``torch.onnx.export``."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs)}


def zoo_io_spec(name: str) -> IOSpec:
    """The canonical spec of zoo model ``name`` with example inputs at batch 1 (2 for text).

    >>> zoo_io_spec("digits-cnn").dynamic_axes
    {'input': {0: 'batch'}, 'logits': {0: 'batch'}}
    """
    import torch

    check_choice(name, "name", "zoo_io_spec", ZOO_SPEC_NAMES)
    if name.startswith("digits"):
        from edgeslim.zoo.digits import load_digits_split

        x = torch.from_numpy(load_digits_split().x_test[:1].copy())
        return IOSpec(
            name,
            "image-classification",
            (TensorSpec("input", "float32", ("batch", 64)),),
            (TensorSpec("logits", "float32", ("batch", 10)),),
            (x,),
        )
    if name == "efficientnet-lite0":
        from edgeslim.datasets import load_photo
        from edgeslim.zoo.efficientnet import preprocess_image

        x = torch.from_numpy(preprocess_image(load_photo("chelsea")))[None]
        return IOSpec(
            name,
            "image-classification",
            (TensorSpec("input", "float32", ("batch", 3, 224, 224)),),
            (TensorSpec("logits", "float32", ("batch", 1000)),),
            (x,),
        )
    from edgeslim.zoo.minilm import EMBEDDING_DIM, encode

    ids, mask = encode(list(EXAMPLE_SENTENCES))
    return IOSpec(
        name,
        "sentence-embedding",
        (
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
        ),
        (TensorSpec("embedding", "float32", ("batch", EMBEDDING_DIM)),),
        (ids, mask),
    )


def export_zoo_model(name: str, path: str | Path, model: Any = None, **kwargs: Any) -> ExportResult:
    """Export zoo model ``name`` (or ``model``, which must share its interface) to ``path``.

    ``kwargs`` go to ``export_onnx`` (``opset``, ``fold_batchnorm``, ``check``,
    ``check_inputs``, ``atol``...). For minilm-l6 the check also runs a batch at a different
    sequence length unless ``check_inputs`` is given.
    """
    spec = zoo_io_spec(name)
    if model is None:
        from edgeslim.zoo import load_model

        model = load_model(name)
    if name == "minilm-l6" and "check_inputs" not in kwargs:
        from edgeslim.zoo.minilm import encode

        kwargs["check_inputs"] = [encode(["Short text.", "Another short one here."])]
    return export_onnx(
        model,
        spec.example_inputs,
        path,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.dynamic_axes,
        **kwargs,
    )
