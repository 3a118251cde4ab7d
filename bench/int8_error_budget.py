"""Where the int8 error of efficientnet-lite0 comes from: weights, activations, or a few layers.

Quantizes efficientnet-lite0 with the int8 preset as ``bench/int8.py`` does (``--budget``
seconds), then replays the int8 graph in PyTorch (``QOperatorSimulator``, which
matches onnxruntime's integers) on the first ``--crops`` crops of the evaluation split and puts
parts of it back in float, one at a time:

- every weight and bias in float, activations still uint8;
- every activation in float (uint8 rounding and clipping off), weights still int8;
- the weights of one kind of layer in float (depthwise, expand, project, head, classifier);
- the weights of each single layer, and each single activation tensor, in float (top 5 shown).

For each it prints the relative logit error, the spread (std) of the error on each crop's
top-1 minus top-2 logit (what flips a prediction) and the top-1 disagreements. If one part
held most of the error, floating it would close most of the gap; if the error is spread
thin, no fallback short of most of the network does.

    .venv/bin/python bench/int8_error_budget.py [--budget 1200] [--crops 96]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_overhead import WORK
from peers import load_average, machine_description, write_section

THREADS = 2
SECTION = "int8 error budget (efficientnet-lite0)"
KINDS = ("_depthwise_conv", "_expand_conv", "_project_conv", "_conv_head", "Gemm")


def simulator_with_float_parts(qmodel: Any, float_model: Any) -> Any:
    """A ``QOperatorSimulator`` whose chosen weights and activations can be put back in float.

    ``float_nodes``: QLinearConv/QGemm names whose weights and biases come from
    ``float_model`` (the same graph before quantization); ``float_tensors``: activation scale
    names whose quantization is skipped (a ReLU6 output keeps its clamp to [0, 6]), or "all".
    """
    import torch

    from edgeslim.ptq._graph import Graph
    from edgeslim.ptq.finetune import QOperatorSimulator

    fgraph = Graph(float_model)
    by_name = {n.name: n for n in float_model.graph.node if n.op_type in ("Conv", "Gemm")}

    class Sim(QOperatorSimulator):
        def __init__(self, model: Any):
            super().__init__(model)
            self.float_nodes: set[str] = set()
            self.float_tensors: set[str] | str = set()

        def _source(self, node: Any) -> Any:
            return by_name[node.name.removesuffix("_quant")]

        def _weight(self, node: Any) -> tuple[Any, Any, Any]:
            w, scale, q = super()._weight(node)
            if node.name in self.float_nodes:
                array = fgraph.array(self._source(node).input[1]).astype(np.float32)
                w = torch.from_numpy(np.ascontiguousarray(array)).reshape(w.shape)
            return w, scale, q

        def _bias(self, node: Any, x_scale: float, w_scale: Any, y_scale: Any) -> Any:
            if node.name in self.float_nodes:
                array = fgraph.array(self._source(node).input[2]).astype(np.float32)
                return torch.from_numpy(np.ascontiguousarray(array))
            return super()._bias(node, x_scale, w_scale, y_scale)

        def _fq(self, v: Any, scale_name: str, zp_name: str) -> Any:
            if self.float_tensors == "all" or scale_name in self.float_tensors:
                return v.clamp(0.0, 6.0) if self._scalar(zp_name) == 0 else v
            return super()._fq(v, scale_name, zp_name)

    return Sim(qmodel)


class Budget:
    """Error statistics of the simulator against the float logits on fixed crops."""

    def __init__(self, sim: Any, crops: np.ndarray, ref: np.ndarray):
        self.sim, self.crops, self.ref = sim, crops, ref
        rows = np.arange(len(ref))
        order = np.argsort(ref, axis=1)
        self.rows, self.top1, self.top2 = rows, order[:, -1], order[:, -2]
        self.gap = ref[rows, self.top1] - ref[rows, self.top2]

    def measure(
        self, float_nodes: set[str] = frozenset(), float_tensors: Any = frozenset()
    ) -> tuple[float, float, int]:
        import torch

        self.sim.float_nodes, self.sim.float_tensors = set(float_nodes), float_tensors
        with torch.no_grad():
            out = np.concatenate(
                [
                    self.sim(torch.from_numpy(self.crops[i : i + 16])).numpy()
                    for i in range(0, len(self.crops), 16)
                ]
            )
        rel = float(np.linalg.norm(out - self.ref) / np.linalg.norm(self.ref))
        gap = out[self.rows, self.top1] - out[self.rows, self.top2]
        return rel, float((gap - self.gap).std()), int((out.argmax(1) != self.top1).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=1200.0, help="preset time budget (s)")
    ap.add_argument("--crops", type=int, default=96, help="held-out crops to measure on")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)

    import onnx
    import torch

    from edgeslim.datasets import photo_crops
    from edgeslim.export import export_zoo_model
    from edgeslim.ptq._graph import make_session, unique_node_names
    from edgeslim.ptq.presets import quantize_int8_preset
    from edgeslim.ptq.static import preprocess

    torch.set_num_threads(THREADS)
    WORK.mkdir(parents=True, exist_ok=True)
    fp32 = WORK / "efficientnet-lite0.onnx"
    if not fp32.exists():
        export_zoo_model("efficientnet-lite0", fp32)
    model = onnx.load(str(fp32))
    t0 = time.perf_counter()
    crops = photo_crops(300, split="evaluation")  # as bench/int8.py quantizes
    result = quantize_int8_preset(
        model,
        photo_crops(512, split="calibration"),
        crops,
        time_budget_s=args.budget,
        threads=THREADS,
        progress=False,
    )
    print(f"int8 preset: {time.perf_counter() - t0:.0f} s, search metrics {result.metrics}")
    float_model = unique_node_names(preprocess(model))
    crops = crops[: args.crops]
    session = make_session(float_model, threads=THREADS)
    ref = np.concatenate(
        [session.run(None, {"input": crops[i : i + 16]})[0] for i in range(0, len(crops), 16)]
    )
    sim = simulator_with_float_parts(result.model, float_model)
    budget = Budget(sim, crops, ref)
    nodes = [n.name for n in result.model.graph.node if n.op_type in ("QLinearConv", "QGemm")]

    lines = [
        "| put back in float | rel. logit error | std of top1-top2 gap error | top-1 flips |",
        "|---|---|---|---|",
    ]
    print("\n" + "\n".join(lines))

    def row(label: str, stats: tuple[float, float, int]) -> None:
        rel, gap_std, flips = stats
        lines.append(f"| {label} | {rel:.4f} | {gap_std:.4f} | {flips} / {len(crops)} |")
        print(lines[-1], flush=True)

    row("nothing (int8 as served)", budget.measure())
    row("all weights and biases", budget.measure(float_nodes=set(nodes)))
    row("all activations", budget.measure(float_tensors="all"))
    row("all weights and activations", budget.measure(set(nodes), "all"))
    for kind in KINDS:
        chosen = {n for n in nodes if kind in n}
        row(f"weights of the {len(chosen)} {kind.strip('_')} layers", budget.measure(chosen))
    singles = sorted((budget.measure({n}), n) for n in nodes)
    for stats, name in singles[:5]:
        row(f"weights of {name} alone", stats)
    tensors = sorted((budget.measure(float_tensors={t}), t) for t in sim.log_scales)
    for stats, name in tensors[:5]:
        row(f"activation {name} alone", stats)
    if not args.no_write:
        head = [
            f"Command: `.venv/bin/python bench/int8_error_budget.py --budget {args.budget:g} "
            f"--crops {args.crops}`",
            "",
            f"{machine_description()} Threads: {THREADS}; load average "
            f"{load_average():.1f} at the end.",
            "",
            f"The int8 preset's model (its search measured top-1 agreement "
            f"{result.metrics['top1_agreement']:.1%} and relative logit error "
            f"{result.metrics['relative_error']:.3f} on the 300 evaluation crops), replayed in "
            f"PyTorch on the first {len(crops)} of them with parts put back in float:",
            "",
        ]
        write_section(SECTION, "\n".join(head + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
