"""Label-free end-to-end tuning of a QOperator int8 model against its float original.

onnxruntime's QOperator graph (QuantizeLinear, QLinearConv, QLinearAdd, Pad,
QLinearGlobalAveragePool, Flatten, QGemm, DequantizeLinear) is replayed in PyTorch with the
exact integer semantics as fake quantization: every quantized tensor is ``(q - zp) * s`` with
``q = clamp(round(v / s) + zp, 0, 255)``, weights are ``int8 * per-channel scale`` and int32
biases are ``int * x_scale * w_scale``. The int8 weights (as a rounding offset in units of
their step, the straight-through estimator carrying the gradient past ``round``) and the
biases are then tuned so that the int8 logits match the float model's logits on unlabeled
calibration images (mean squared error, or the KL divergence of the float model's softmax to
the int8 model's), together with each activation scale (as a factor on its calibrated value,
learned in log space), and written back into the same graph: the result is the same
onnxruntime model with other integers and scales in its initializers, so its speed and size
are unchanged. Weight scales and all zero points are kept. Only the compression side imports
this (torch).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeslim._validate import check_choice, check_int_range, check_positive
from edgeslim.errors import ConfigError, ModelError
from edgeslim.ptq._graph import Graph

__all__ = [
    "LOSSES",
    "SUPPORTED_OPS",
    "QOperatorSimulator",
    "finetune_qoperator",
    "float_logits",
]

#: What the tuning minimises between the int8 and the float outputs (see finetune_qoperator).
LOSSES = ("mse", "kl")

#: Ops of a QOperator model that the simulator replays.
SUPPORTED_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearAdd",
    "QLinearGlobalAveragePool",
    "QGemm",
    "Flatten",
    "Pad",
    "Conv",
    "Clip",
    "Relu",
    "Add",
    "GlobalAveragePool",
    "Gemm",
)


def float_logits(model: Any) -> Any:
    """Let a final QGemm answer in float (in place; returns ``model``).

    onnxruntime's quantizer requantizes the classifier's output to uint8 and dequantizes it
    again; with ~1000 logits over a wide range that step (~0.06) alone flips near-ties. QGemm
    without ``y_scale`` writes float32 directly, at the same cost.
    """
    graph = Graph(model)
    outputs = {o.name for o in model.graph.output}
    for node in list(model.graph.node):
        if node.op_type != "DequantizeLinear" or node.output[0] not in outputs:
            continue
        gemm = graph.producer.get(node.input[0])
        users = graph.consumers.get(node.input[0], [])
        if gemm is None or gemm.op_type != "QGemm" or len(gemm.input) < 9 or len(users) != 1:
            continue
        dropped = set(gemm.input[7:])
        del gemm.input[7:]
        gemm.output[0] = node.output[0]
        model.graph.node.remove(node)
        used = {i for n in model.graph.node for i in n.input}
        for tensor in [t for t in model.graph.initializer if t.name in dropped - used]:
            model.graph.initializer.remove(tensor)
    return model


def _activation_scales(node: Any) -> list[str]:
    """Names of the activation scales ``node`` produces (its output's scale)."""
    slot = {"QuantizeLinear": 1, "QLinearConv": 6, "QLinearAdd": 6, "QLinearGlobalAveragePool": 3}
    if node.op_type in slot:
        return [node.input[slot[node.op_type]]]
    if node.op_type == "QGemm" and len(node.input) > 7 and node.input[7]:
        return [node.input[7]]
    return []


def _ste_round(x: Any) -> Any:
    return x + (x.round() - x).detach()


class QOperatorSimulator:
    """A PyTorch replay of a QOperator int8 model with tunable weights and biases.

    ``model``: an ``onnx.ModelProto`` as onnxruntime's ``quantize_static`` writes it in
    QOperator format (uint8 activations, int8 weights). Raises ``ModelError`` for ops outside
    ``SUPPORTED_OPS``. ``forward(x)`` takes a float tensor (N, C, H, W) and returns the graph's
    first output; ``export()`` writes the tuned integers into a copy of ``model``.
    """

    def __init__(self, model: Any):
        import torch

        self.model = model
        self.graph = Graph(model)
        other = sorted({n.op_type for n in model.graph.node} - set(SUPPORTED_OPS))
        if other:
            raise ModelError(
                f"The QOperator simulator supports {list(SUPPORTED_OPS)}; the model also has "
                f"{other}."
            )
        self.input_name = model.graph.input[0].name
        self.output_name = model.graph.output[0].name
        self.offsets: dict[str, Any] = {}  # node -> rounding offset (weight steps)
        # node -> the largest weight magnitude its grid allows: what its integers span (127,
        # or 64 for 7-bit weights, which keep onnxruntime's u8 x s8 kernels exact without VNNI)
        self.weight_bounds: dict[str, float] = {}
        self.bias_deltas: dict[str, Any] = {}  # node -> bias change (output steps)
        self.log_scales: dict[str, Any] = {}  # activation scale name -> log(scale / initial)
        self._const: dict[str, Any] = {}
        for node in model.graph.node:
            for name in _activation_scales(node):
                self.log_scales.setdefault(name, torch.zeros((), dtype=torch.float32))
        for node in model.graph.node:
            if node.op_type in ("QLinearConv", "QGemm"):
                w = self.graph.array(node.input[3])
                self.offsets[node.name] = torch.zeros(w.shape, dtype=torch.float32)
                self.weight_bounds[node.name] = float(max(np.abs(w.astype(np.int16)).max(), 1))
                rows = w.shape[0]
                self.bias_deltas[node.name] = torch.zeros(rows, dtype=torch.float32)

    def parameters(self) -> list[Any]:
        """The tunable tensors (weight rounding offsets, bias deltas, activation log-scales)."""
        return (
            list(self.offsets.values())
            + list(self.bias_deltas.values())
            + list(self.log_scales.values())
        )

    def _scalar(self, name: str) -> float:
        return float(self.graph.array(name))

    def _scale(self, name: str) -> Any:
        """An activation scale: its initial value times the tuned factor."""
        factor = self.log_scales.get(name)
        s = self._scalar(name)
        return s if factor is None else s * factor.exp()

    def _tensor(self, name: str) -> Any:
        import torch

        if name not in self._const:
            self._const[name] = torch.from_numpy(
                np.ascontiguousarray(self.graph.array(name)).astype(np.float32)
            )
        return self._const[name]

    def _fq(self, v: Any, scale_name: str, zp_name: str) -> Any:
        """Fake-quantize ``v`` to uint8 with the tensor's scale and zero point."""
        s, zp = self._scale(scale_name), self._scalar(zp_name)
        q = (_ste_round(v / s) + zp).clamp(0.0, 255.0)
        return (q - zp) * s

    def _weight(self, node: Any) -> tuple[Any, Any, Any]:
        """(float weight, weight scale broadcastable to rows, int weight + offset)."""
        w_int = self._tensor(node.input[3])
        scale = self._tensor(node.input[4])
        bound = self.weight_bounds[node.name]
        q = (_ste_round(w_int + self.offsets[node.name])).clamp(-bound, bound)
        shape = (-1,) + (1,) * (q.dim() - 1)
        ws = scale.reshape(shape) if scale.numel() > 1 else scale
        return q * ws, scale, q

    def _bias(self, node: Any, x_scale: float, w_scale: Any, y_scale: Any) -> Any:
        import torch

        rows = self.bias_deltas[node.name].shape[0]
        name = node.input[8] if node.op_type == "QLinearConv" else node.input[6]
        base = (
            self._tensor(name) * x_scale * w_scale
            if name
            else torch.zeros(rows, dtype=torch.float32)
        )
        return base + self.bias_deltas[node.name] * (y_scale if y_scale is not None else x_scale)

    def _conv(self, node: Any, x: Any, w: Any, bias: Any) -> Any:
        """A 2-D convolution as ``node``'s attributes say; asymmetric pads (a TF "same" pad
        merged into the convolution) become an explicit zero pad first, which is what padding
        with the zero point is in the quantized model."""
        import torch.nn.functional as F

        top, left, bottom, right = self.graph.attr(node, "pads", [0, 0, 0, 0])
        if (top, left) != (bottom, right):
            x = F.pad(x, [left, right, top, bottom])
            top = left = 0
        return F.conv2d(x, w, bias,
                        stride=tuple(self.graph.attr(node, "strides", [1, 1])),
                        padding=(top, left),
                        dilation=tuple(self.graph.attr(node, "dilations", [1, 1])),
                        groups=int(self.graph.attr(node, "group", 1)))

    def forward(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        env: dict[str, Any] = {self.input_name: x}
        for node in self.model.graph.node:
            op, ins = node.op_type, list(node.input)
            if op == "QuantizeLinear":
                out = self._fq(env[ins[0]], ins[1], ins[2])
            elif op == "DequantizeLinear":
                out = env[ins[0]]
            elif op == "Pad":
                pads = [int(p) for p in self.graph.array(ins[1])]
                half = len(pads) // 2
                torch_pads: list[int] = []
                for axis in reversed(range(half)):
                    torch_pads += [pads[axis], pads[axis + half]]
                value = 0.0  # a quantized tensor is padded with its zero point: 0 dequantized
                if len(ins) > 2 and ins[2] and self.graph.array(ins[2]).dtype.kind == "f":
                    value = float(self.graph.array(ins[2]))
                out = F.pad(env[ins[0]], torch_pads, value=value)
            elif op == "QLinearConv":
                w, w_scale, _ = self._weight(node)
                xs, ys = self._scalar(ins[1]), self._scale(ins[6])
                y = self._conv(node, env[ins[0]], w, self._bias(node, xs, w_scale, ys))
                out = self._fq(y, ins[6], ins[7])
            elif op == "QLinearAdd":
                out = self._fq(env[ins[0]] + env[ins[3]], ins[6], ins[7])
            elif op == "QLinearGlobalAveragePool":
                out = self._fq(env[ins[0]].mean(dim=(2, 3), keepdim=True), ins[3], ins[4])
            elif op == "Conv":  # a node kept in float
                bias = self._tensor(ins[2]) if len(ins) > 2 and ins[2] else None
                out = self._conv(node, env[ins[0]], self._tensor(ins[1]), bias)
            elif op == "Clip":
                lo = float(self.graph.array(ins[1])) if len(ins) > 1 and ins[1] else None
                hi = float(self.graph.array(ins[2])) if len(ins) > 2 and ins[2] else None
                out = env[ins[0]].clamp(lo, hi)
            elif op == "Relu":
                out = env[ins[0]].clamp(min=0.0)
            elif op == "Add":
                a, b = (env[i] if i in env else self._tensor(i) for i in ins[:2])
                out = a + b
            elif op == "GlobalAveragePool":
                out = env[ins[0]].mean(dim=(2, 3), keepdim=True)
            elif op == "Gemm":
                a = env[ins[0]]
                if self.graph.attr(node, "transA", 0):
                    a = a.t()
                w = self._tensor(ins[1])
                w = w.t() if self.graph.attr(node, "transB", 0) else w
                out = float(self.graph.attr(node, "alpha", 1.0)) * (a @ w)
                if len(ins) > 2 and ins[2]:
                    out = out + float(self.graph.attr(node, "beta", 1.0)) * self._tensor(ins[2])
            elif op == "Flatten":
                axis = int(self.graph.attr(node, "axis", 1))
                out = torch.flatten(env[ins[0]], start_dim=axis)
            else:  # QGemm
                if self.graph.attr(node, "transA", 0) or not self.graph.attr(node, "transB", 0):
                    raise ModelError(f"QGemm {node.name!r}: only transA=0, transB=1 is supported.")
                w, w_scale, _ = self._weight(node)
                xs = self._scalar(ins[1])
                ys = self._scale(ins[7]) if len(ins) > 7 and ins[7] else None
                alpha = float(self.graph.attr(node, "alpha", 1.0))
                y = alpha * (env[ins[0]] @ w.t()) + self._bias(node, xs, w_scale, ys)
                out = self._fq(y, ins[7], ins[8]) if ys else y
            env[node.output[0]] = out
        return env[self.output_name]

    __call__ = forward

    def export(self) -> Any:
        """A copy of the model with the tuned int8 weights, int32 biases and scales."""
        import onnx
        import torch

        out = copy.deepcopy(self.model)
        graph = Graph(out)
        with torch.no_grad():
            for node in out.graph.node:
                if node.name not in self.offsets:
                    continue
                _, w_scale, q = self._weight(node)
                graph.set_array(node.input[3], q.numpy().astype(np.int8))
                ins = list(node.input)
                conv = node.op_type == "QLinearConv"
                y_name = ins[6] if conv else (ins[7] if len(ins) > 7 else "")
                ys = self._scale(y_name) if y_name else None
                bias = self._bias(node, self._scalar(ins[1]), w_scale, ys)
                steps = float(self._scale(ins[1])) * w_scale.double().numpy()
                ints = np.round(bias.double().numpy() / steps)
                ints = np.clip(ints, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
                slot = 8 if conv else 6
                if len(ins) <= slot or not ins[slot]:
                    while len(node.input) <= slot:
                        node.input.append("")
                    node.input[slot] = graph.fresh_name(node.name + "_bias_quantized")
                graph.set_array(node.input[slot], ints.astype(np.int32))
            for name in self.log_scales:
                old = graph.array(name)
                value = np.full(old.shape, float(self._scale(name)), dtype=old.dtype)
                graph.set_array(name, value)
        onnx.checker.check_model(out)
        return out


def finetune_qoperator(
    qmodel: Any,
    float_fn: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    *,
    steps: int | None = None,
    batch_size: int = 8,
    lr_weight: float = 1e-2,
    lr_bias: float = 3e-3,
    lr_scale: float = 3e-3,
    flip: bool = True,
    time_budget_s: float | None = None,
    threads: int = 2,
    seed: int = 0,
    loss: str = "mse",
    log: Callable[[int, float], None] | None = None,
) -> Any:
    """Tune the int8 weights, int32 biases and activation scales of ``qmodel`` (QOperator).

    ``float_fn(x)``: the float model's outputs for a float32 batch ``x``. ``images``: unlabeled
    inputs (N, C, H, W), drawn ``batch_size`` at a time (each mirrored left-right with
    probability 1/2 when ``flip``). ``loss``: ``"mse"``, the mean squared error between the
    simulated int8 outputs and the float outputs (any output), or ``"kl"``, for classifiers
    whose output is logits: the KL divergence from the float model's softmax to the int8
    model's. KL weighs each class by how likely the float model finds it, so the tuning spends
    the weights' few levels on the classes that decide the top-1 rather than on the hundreds
    that no crop is near (on efficientnet-lite0 it keeps the top-1 of more crops; see
    bench/RESULTS.md). The learning rates decay along a cosine over
    ``steps`` optimizer steps, and ``time_budget_s`` (seconds) stops the tuning early when it
    ends first: the result then depends on the machine's speed, otherwise it is the same on
    every run. ``steps=None`` tunes for ``time_budget_s``, the cosine following the clock. At
    least one step runs. Returns the tuned ModelProto (a copy);
    raises ``ModelError`` when the graph has ops the simulator does not replay.
    """
    import torch

    if steps is None and time_budget_s is None:
        raise ConfigError(
            "finetune_qoperator needs 'steps' or 'time_budget_s' to know when to stop. "
            "Got neither."
        )
    if steps is not None:
        check_int_range(steps, "steps", "finetune_qoperator", 1, 10_000_000)
    check_choice(loss, "loss", "finetune_qoperator", LOSSES)
    if time_budget_s is not None:
        check_positive(time_budget_s, "time_budget_s", "finetune_qoperator", allow_zero=True)
    sim = QOperatorSimulator(qmodel)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        for p in sim.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(
            [
                {"params": list(sim.offsets.values()), "lr": lr_weight},
                {"params": list(sim.bias_deltas.values()), "lr": lr_bias},
                {"params": list(sim.log_scales.values()), "lr": lr_scale},
            ]
        )
        data = np.asarray(images, dtype=np.float32)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        base_lrs = [group["lr"] for group in opt.param_groups]
        step = 0
        while steps is None or step < steps:
            elapsed = time.perf_counter() - start
            if step and time_budget_s is not None and elapsed > time_budget_s:
                break
            # cosine decay over the steps (the same on every run), or over the clock
            if steps is not None:
                done = step / steps
            else:
                assert time_budget_s is not None
                done = elapsed / time_budget_s if time_budget_s > 0 else 1.0
            for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
            x = data[rng.choice(len(data), min(batch_size, len(data)), replace=False)]
            if flip and x.ndim == 4:
                mirror = rng.random(len(x)) < 0.5
                x = np.where(mirror[:, None, None, None], x[..., ::-1], x)
            x = np.ascontiguousarray(x)
            target = torch.from_numpy(np.asarray(float_fn(x), dtype=np.float32))
            out = sim(torch.from_numpy(x))
            if loss == "kl":
                value = torch.nn.functional.kl_div(
                    torch.log_softmax(out, dim=-1),
                    torch.log_softmax(target, dim=-1),
                    log_target=True,
                    reduction="batchmean",
                )
            else:
                value = torch.mean((out - target) ** 2)
            opt.zero_grad()
            value.backward()
            opt.step()
            with torch.no_grad():  # a weight moves at most one step from where it started
                for p in sim.offsets.values():
                    p.clamp_(-1.0, 1.0)
            if log is not None:
                log(step, float(value.detach()))
            step += 1
        return sim.export()
    finally:
        torch.set_num_threads(previous_threads)
