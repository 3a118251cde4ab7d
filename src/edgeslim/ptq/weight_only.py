"""Weight-only int4/int8 for transformer linears: onnxruntime's ``MatMulNBits``.

Block-wise quantized weights (``block_size`` weights share a scale); with ``accuracy_level=4``
the CPU kernel also quantizes activations to int8 per block and uses integer dot products.
Large embedding tables can be stored as int8 per row alongside (``dynamic.quantize_embeddings``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgeslim._validate import check_choice, check_int_range
from edgeslim.errors import ConfigError
from edgeslim.ptq._graph import Graph

__all__ = ["quantize_weight_only"]


def require_matmuls(model: Any, exclude: Sequence[str], what: str, instead: str) -> None:
    """A ConfigError unless ``model`` has a MatMul with a constant 2-D weight outside
    ``exclude``: the linears the dynamic and weight-only schemes quantize."""
    skipped = set(exclude)
    graph = Graph(model)
    if not [n for n in graph.weighted_nodes(("MatMul",))
            if n.name not in skipped and graph.array(n.input[1]).ndim == 2]:
        kinds = sorted({n.op_type for n in model.graph.node
                        if n.op_type in ("Gemm", "Conv", "MatMul", "ConvTranspose")})
        raise ConfigError(
            f"{what} replaces MatMuls with constant weights (transformer linears), and this "
            f"model has none to quantize; its linear layers are {', '.join(kinds) or 'absent'}. "
            f"Use {instead} instead."
        )


def quantize_weight_only(
    model: Any,
    *,
    bits: int = 4,
    block_size: int = 32,
    accuracy_level: int = 4,
    symmetric: bool = True,
    exclude: Sequence[str] = (),
) -> Any:
    """Replace MatMuls with constant weights by ``MatMulNBits`` (``bits`` 4 or 8) in place.

    ``block_size``: a power of two >= 16. ``accuracy_level``: 0 (unset), 1 (fp32), 4 (int8
    compute). Returns the quantized ModelProto.
    """
    func = "quantize_weight_only"
    if bits not in (4, 8):
        raise ConfigError(f"The 'bits' parameter of {func} must be 4 or 8. Got {bits!r} instead.")
    check_int_range(block_size, "block_size", func, 16, 4096)
    if block_size & (block_size - 1):
        raise ConfigError(
            f"The 'block_size' parameter of {func} must be a power of two. Got {block_size}."
        )
    check_choice(str(accuracy_level), "accuracy_level", func, ("0", "1", "2", "3", "4"))
    require_matmuls(model, exclude, func, "the static or dynamic scheme")
    from edgeslim.errors import require

    require("onnx_ir", "compress", "Weight-only quantization (MatMulNBits)")
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level or None,
            nodes_to_exclude=list(exclude),
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    finally:
        logger.setLevel(level)
    return quantizer.model.model
