"""How each quantization scheme builds a model with a given set of nodes kept in float.

``Builder`` prepares once (pre-processing, equalization, GPTQ rounding, bias corrections,
SmoothQuant), then ``build(exclude)`` quantizes with onnxruntime and is called many times by
the search. Activation units (a tensor kept float together with its producer and readers) and
the size-budget helpers live here too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.ptq._graph import Graph, unique_node_names
from edgeslim.ptq.dynamic import embedding_gathers
from edgeslim.ptq.weight_only import require_matmuls

__all__ = ["Builder", "activation_units", "float_bytes", "within_budget"]


class Builder:
    """Prepared state of one scheme: ``build(exclude)`` returns a quantized ModelProto."""

    def __init__(self, model: Any, feeds: list[dict], cfg: dict[str, Any], workdir: Path):
        self.cfg = cfg
        self.scheme = cfg["scheme"]
        #: reduce_range="unpaired" (static): 8-bit weights, then ``exact.narrow_unpaired``
        self.narrow = self.scheme == "static" and cfg["reduce_range"] == "unpaired"
        #: the 7-bit grid for every weight: True, or "unpaired" where nothing pairs (dynamic)
        self.reduce_range = bool(cfg["reduce_range"]) and not self.narrow
        self.feeds = feeds
        self.workdir = workdir
        self.cache = workdir / f"ranges-{cfg['method']}.json"
        #: dynamic scheme: MatMul inputs quantized with a calibrated range, and the
        #: statistics of every candidate input (``dynamic.static_inputs``)
        self.static_ranges: dict[str, tuple[float, float]] = {}
        self.input_stats: dict[str, dict[str, Any]] = {}
        if self.scheme == "static":
            from edgeslim.ptq.equalize import equalize
            from edgeslim.ptq.rounding import round_weights
            from edgeslim.ptq.static import preprocess

            self.float_model = unique_node_names(preprocess(model))
            if cfg["equalization"]:
                equalize(self.float_model, feeds, threads=cfg["threads"])
            self.prepared = copy.deepcopy(self.float_model)
            if cfg["weight_rounding"] == "gptq" or cfg["bias_correction"]:
                round_weights(
                    self.prepared,
                    feeds,
                    method=cfg["weight_rounding"],
                    bias_correction=cfg["bias_correction"],
                    per_channel=cfg["per_channel"],
                    reduce_range=self.reduce_range,
                    threads=cfg["threads"],
                )
            if cfg["activation_bias_correction"]:
                self._correct_bias()
        else:
            if self.scheme == "dynamic" and not (
                cfg["quantize_embeddings"] and embedding_gathers(model, exclude=cfg["exclude"])
            ):  # nothing it would quantize: a float model is no int8 result
                require_matmuls(model, cfg["exclude"], "The dynamic scheme", "the static scheme")
            self.float_model = unique_node_names(copy.deepcopy(model))
            self.prepared = copy.deepcopy(self.float_model)
            if self.scheme == "dynamic" and cfg["smooth_alpha"]:
                from edgeslim.ptq.smooth import smooth_matmuls

                smooth_matmuls(self.prepared, feeds, alpha=cfg["smooth_alpha"])
            if self.scheme == "dynamic" and cfg.get("static_max_spread") is not None:
                from edgeslim.ptq.dynamic import static_inputs

                self.static_ranges, self.input_stats = static_inputs(
                    self.prepared,
                    feeds,
                    max_spread=cfg["static_max_spread"],
                    exclude=cfg["exclude"],
                    threads=cfg["threads"],
                )
            #: the dynamic scheme's weights before rounding, for the nodes a build keeps float
            self.unrounded = self.prepared
            if self.scheme == "dynamic" and cfg["weight_rounding"] == "gptq":
                self._round_matmuls()

    def _round_matmuls(self) -> None:
        """GPTQ-round the weights ``rowwise_dynamic`` will quantize, on its grid (symmetric
        per output column, 7-bit with ``reduce_range``), so that it keeps these integers. On
        minilm-l6 (preset, 300 sentences) this took the mean cosine from 0.9988 to 0.9992, the
        lowest from 0.9970 to 0.9982 and the top-5 overlap from 0.960 to 0.967."""
        from edgeslim.ptq.rounding import round_weights

        cfg = self.cfg
        self.unrounded = copy.deepcopy(self.prepared)
        groups = Graph(self.prepared).matmul_groups(cfg["exclude"])
        round_weights(
            self.prepared,
            self.feeds,
            nodes=[n.name for nodes in groups.values() for n in nodes],
            method="gptq",
            bias_correction=False,  # a MatMul has no bias input (its Add is another node)
            per_channel=True,
            reduce_range=self.reduce_range,
            threads=cfg["threads"],
        )

    def _unround(self, model: Any, exclude: Sequence[str]) -> None:
        """Give the MatMuls a dynamic build keeps in float their unrounded weights."""
        graph, orig = Graph(model), Graph(self.unrounded)
        for name in exclude:
            node = graph.nodes.get(name)
            if node is not None and len(node.input) > 1:
                w = orig.array(node.input[1])
                if w is not None:
                    graph.set_array(node.input[1], w)

    def _correct_bias(self) -> None:
        """Sequential empirical bias correction measured on the QDQ model (float deltas)."""
        from edgeslim.ptq.bias_correction import apply_bias_deltas, correct_quantized_bias

        cfg = self.cfg
        exclude = self.expand(self.base_exclude)
        model = copy.deepcopy(self.prepared)
        self._restore(model, exclude)
        qdq = self._static(model, exclude, "qdq")
        subset, rows = [], 0
        for feed in self.feeds:  # 64 samples are plenty for per-channel means
            subset.append(feed)
            rows += len(next(iter(feed.values())))
            if rows >= 64:
                break
        deltas = correct_quantized_bias(self.prepared, qdq, subset, threads=cfg["threads"])
        apply_bias_deltas(self.prepared, deltas)

    def _static(self, model: Any, exclude: list[str], quant_format: str) -> Any:
        """onnxruntime's static quantizer with this build's settings and calibration cache."""
        from edgeslim.ptq.static import ort_quantize_static

        cfg = self.cfg
        return ort_quantize_static(
            model,
            self.feeds,
            method=cfg["method"],
            per_channel=cfg["per_channel"],
            reduce_range=self.reduce_range,
            activation_type=cfg["activation_type"],
            quant_format=quant_format,
            exclude=exclude,
            percentile=cfg["percentile"],
            calibration_cache=self.cache,
        )

    def candidates(self) -> list[tuple[str, str]]:
        graph = Graph(self.prepared)
        if self.scheme == "static":
            return [(n.name, n.op_type) for n in graph.weighted_nodes()] + [
                (key, "activation") for key in self.units
            ]
        nodes = [
            (n.name, n.op_type)
            for n in graph.weighted_nodes(("MatMul",))
            if graph.array(n.input[1]).ndim == 2
        ]
        return nodes

    @property
    def base_exclude(self) -> list[str]:
        """What every build keeps in float: the user's ``exclude`` and, for the static scheme,
        those of the first ``float_leading_units`` activation units (graph order) whose nodes
        hold under 5% of the weights. The stem's output feeds the most noise forward and
        its convs are tiny, so keeping it float costs almost no bytes (nor time)."""
        leading = []
        if self.units and self.cfg.get("float_leading_units", 0):
            graph = Graph(self.prepared)
            total = sum(
                int(np.prod(graph.initializers[n.input[1]].dims)) for n in graph.weighted_nodes()
            )
            for key in list(self.units)[: int(self.cfg["float_leading_units"])]:
                nodes = [graph.nodes[n] for n in self.units[key] if n in graph.nodes]
                size = sum(
                    int(np.prod(graph.initializers[n.input[1]].dims))
                    for n in nodes
                    if len(n.input) > 1 and n.input[1] in graph.initializers
                )
                if size <= 0.05 * total:
                    leading.append(key)
        return list(self.cfg["exclude"]) + leading

    @property
    def units(self) -> dict[str, list[str]]:
        """Static scheme: ``"tensor:NAME"`` -> the nodes to keep in float so that activation
        NAME is never quantized (its producer, folded Relu/Clip/Pad, and all its readers)."""
        if not hasattr(self, "_units"):
            self._units = activation_units(self.prepared) if self.scheme == "static" else {}
        return self._units

    def expand(self, exclude: Sequence[str]) -> list[str]:
        """Node names for ``exclude``, with activation units replaced by their nodes."""
        out: list[str] = []
        for e in exclude:
            for name in self.units.get(e, [e]):
                if name not in out:
                    out.append(name)
        return out

    def build(self, exclude: Sequence[str]) -> Any:
        exclude = self.expand(self.base_exclude + list(exclude))
        model = copy.deepcopy(self.prepared)
        cfg = self.cfg
        if self.scheme == "static":

            self._restore(model, exclude)
            quantized = self._static(model, exclude, cfg["quant_format"])
            if self.narrow:
                from edgeslim.ptq.exact import narrow_unpaired

                narrow_unpaired(quantized)
            if cfg.get("float_logits") and cfg["quant_format"] == "qoperator":
                from edgeslim.ptq.finetune import float_logits

                float_logits(quantized)
            return quantized
        from edgeslim.ptq.dynamic import quantize_embeddings, rowwise_dynamic

        if self.scheme == "dynamic":
            if self.unrounded is not self.prepared:
                self._unround(model, exclude)
            rowwise_dynamic(
                model,
                exclude=exclude,
                reduce_range=self.reduce_range,
                static_ranges=self.static_ranges,
            )
        else:
            from edgeslim.ptq.weight_only import quantize_weight_only

            model = quantize_weight_only(model, bits=cfg["bits"], exclude=exclude)
        if cfg["quantize_embeddings"]:
            quantize_embeddings(model, exclude=exclude)
        if self.scheme == "dynamic" and cfg["fuse_attention"]:
            from edgeslim.ptq.attention import fuse_attention

            fuse_attention(model, self.feeds, threads=cfg["threads"])
        return model

    def _restore(self, model: Any, exclude: Sequence[str]) -> None:
        """Give excluded nodes back their float weights and bias (undo the rounding)."""
        graph, orig = Graph(model), Graph(self.float_model)
        for name in exclude:
            node, onode = graph.nodes.get(name), orig.nodes.get(name)
            if node is None or onode is None or len(node.input) < 2:
                continue
            w = orig.array(onode.input[1])
            if w is not None:
                graph.set_array(node.input[1], w)
            bias = graph.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if bias is not None:  # a C computed by the graph was never changed
                b = orig.array(onode.input[2]) if len(onode.input) > 2 and onode.input[2] else None
                graph.set_array(node.input[2], b if b is not None else np.zeros_like(bias))


def activation_units(model: Any) -> dict[str, list[str]]:
    """For each activation a weighted node produces (after a folded Relu/Clip), the nodes that
    must stay float for it never to be quantized: producer, activation, Pads, readers."""
    graph = Graph(model)
    units: dict[str, list[str]] = {}
    for node in graph.weighted_nodes():
        chain = [node]
        tensor = node.output[0]
        users = graph.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
            chain.append(users[0])
            tensor = users[0].output[0]
        readers = list(graph.consumers.get(tensor, []))
        for r in list(readers):
            if r.op_type == "Pad":
                chain.append(r)
                readers.remove(r)
                readers += graph.consumers.get(r.output[0], [])
        if not readers or tensor in graph.graph_outputs:
            continue
        units[f"tensor:{tensor}"] = [n.name for n in chain + readers]
    return units


def float_bytes(model: Any) -> int:
    """Bytes of the float initializers of ``model`` (its fp32 parameters)."""
    floats = {1, 10, 11, 16}  # float, float16, double, bfloat16
    sizes = {1: 4, 10: 2, 11: 8, 16: 2}
    total = 0
    for t in model.graph.initializer:
        if t.data_type in floats:
            total += int(np.prod(t.dims, dtype=np.int64)) * sizes[t.data_type]
    return total


def within_budget(model: Any, ranked: list[str], slack: float) -> list[str]:
    """The prefix-greedy subset of ``ranked`` whose float weights fit in ``slack`` bytes
    (a node kept in float costs about 3 bytes per weight more than its int8 form)."""
    graph = Graph(model)
    units = activation_units(model) if any(r.startswith("tensor:") for r in ranked) else {}
    kept: list[str] = []
    spent, floated = 0.0, set()
    for key in ranked:
        cost = 0.0
        for name in units.get(key, [key]):
            node = graph.nodes.get(name)
            if node is None or name in floated or len(node.input) < 2:
                continue
            w = graph.initializers.get(node.input[1])
            cost += 3.0 * float(np.prod(w.dims)) if w is not None else 0.0
        if spent + cost <= slack:
            kept.append(key)
            spent += cost
            floated.update(units.get(key, [key]))
    return kept
