"""The report's PNG plots (matplotlib, Agg backend: no display needed).

Each ``plot_*`` takes the dict of ``report.load_run`` and a path, writes a PNG and returns
True, or returns False when there is nothing to draw (e.g. no sensitivity was measured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeslim.errors import require

__all__ = ["plot_latency", "plot_pareto", "plot_sensitivity", "plot_sparsity"]


def _plt() -> Any:
    require("matplotlib", "compress", "The optimize report's plots")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return True


def plot_pareto(data: dict[str, Any], path: Path) -> bool:
    judged, best, base = data["judged"], data["best"], data["base"]
    if not judged:
        return False
    plt = _plt()
    s = data["settings"]
    b = s["budget"]
    metric = s["metric_name"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("latency_ms", "latency, batch 1 (ms, device)", b.get("latency_ms")),
              ("size_mb", "bundle size (MB)", b.get("size_mb")),
              ("throughput", f"throughput, batch {data['throughput_batch']} (/s, device)", None))
    for ax, (attr, xlabel, limit) in zip(axes, panels, strict=True):
        ok = [j for j in judged if j.meets]
        bad = [j for j in judged if not j.meets]
        ax.scatter([getattr(j, attr) for j in bad], [j.metric for j in bad], c="#bbbbbb",
                   label="misses budget", s=22)
        ax.scatter([getattr(j, attr) for j in ok], [j.metric for j in ok], c="#3b7dd8",
                   label="meets budget", s=22)
        front = sorted((j for j in judged if j.pareto), key=lambda j: getattr(j, attr))
        if attr != "throughput":
            ax.plot([getattr(j, attr) for j in front], [j.metric for j in front], "-",
                    c="#d62728", lw=1, label="Pareto front (metric, latency, size)")
        if base is not None:
            ax.scatter([getattr(base, attr)], [base.metric], marker="s", c="k", s=50,
                       label="fp32")
            ax.axhline(base.metric - b["max_drop"], ls="--", c="#d62728", lw=0.8)
        if best is not None:
            ax.scatter([getattr(best, attr)], [best.metric], marker="*", c="#ffbf00", s=220,
                       edgecolors="k", label="chosen", zorder=5)
        if limit:
            ax.axvline(limit, ls="--", c="#d62728", lw=0.8)
        if attr != "throughput" and all(getattr(j, attr) > 0 for j in judged):
            ax.set_xscale("log")
        if attr == "throughput":
            from matplotlib.ticker import FuncFormatter

            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:g}k"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


_NAME_KEYS = ("node", "layer", "name")
_VALUE_KEYS = ("gain", "drop", "sensitivity", "error", "mse")


def _per_layer(value: Any) -> list[tuple[str, float]]:
    """The first list of ``{node|layer|name, gain|drop|...}`` found in a step report."""
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        rows = []
        for r in value:
            name = next((r[k] for k in _NAME_KEYS if k in r), None)
            val = next((r[k] for k in _VALUE_KEYS if isinstance(r.get(k), (int, float))
                        and not isinstance(r.get(k), bool)), None)
            if name is not None and val is not None:
                rows.append((str(name), float(val)))
        if rows:
            return rows
    if isinstance(value, dict):
        for v in value.values():
            found = _per_layer(v)
            if found:
                return found
    return []


def _ptq_sensitivity(data: dict[str, Any]) -> list[tuple[str, float]]:
    """Per-layer figures from a ptq step's report (e.g. its sensitivity ranking), if any."""
    for j in data["judged"]:
        for step in j.result.get("steps", []):
            if step.get("step") == "ptq":
                found = _per_layer(step.get("report") or {})
                if found:
                    return found
    return []


def plot_sensitivity(data: dict[str, Any], path: Path) -> bool:
    plt = _plt()
    ptq = _ptq_sensitivity(data)
    rows = data["sensitivity"]
    if ptq:
        ptq = ptq[:40]
        fig, ax = plt.subplots(figsize=(9, 0.3 * len(ptq) + 1.5))
        ax.barh([n for n, _ in ptq][::-1], [v for _, v in ptq][::-1], color="#3b7dd8")
        ax.set_xlabel("per-node int8 sensitivity from ptq (metric gained by keeping the node "
                      "in float)")
        return _save(fig, path)
    if not rows:
        return False
    keys = [k for k in rows[0] if k.startswith("drop@")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) * max(1, len(keys)) / 1.5 + 1.5))
    height = 0.8 / max(1, len(keys))
    for i, k in enumerate(keys):
        ax.barh([n + (i - (len(keys) - 1) / 2) * height for n in range(len(rows))],
                [100 * r[k] for r in rows], height=height, label=f"{k[5:]} of the layer pruned")
    ax.set_yticks(range(len(rows)), [r["layer"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{data['settings']['metric_name']} drop (points) when only this layer "
                  "is pruned, no fine-tuning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_sparsity(data: dict[str, Any], path: Path) -> bool:
    best, base = data["best"], data["base"]
    if best is None or base is None:
        return False
    layers = best.result.get("layers") or []
    ref = {r["name"]: r for r in base.result.get("layers") or []}
    ref_list = base.result.get("layers") or []
    if not layers:
        return False
    plt = _plt()
    names, kept, zeros = [], [], []
    for i, r in enumerate(layers[:40]):
        orig = ref.get(r["name"]) or (ref_list[i] if i < len(ref_list) else None)
        names.append(f"{r['name']} {tuple(r['shape'])}")
        kept.append(r["params"] / orig["params"] if orig and orig["params"] else 1.0)
        zeros.append(r["zeros"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    y = range(len(names))
    ax.barh([v - 0.2 for v in y], kept, height=0.4, color="#3b7dd8",
            label="weights kept vs fp32 (structured pruning)")
    ax.barh([v + 0.2 for v in y], zeros, height=0.4, color="#ff7f0e",
            label="fraction of zeros (unstructured pruning)")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_title(f"chosen: {best.label}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_latency(data: dict[str, Any], path: Path) -> bool:
    best, base = data["best"], data["base"]
    chosen = [base, best] + [j for j in data["judged"] if j.pareto]
    seen, series = set(), []
    factor = float(data["settings"]["factor"])
    for j in chosen:
        if j is None or j.key in seen or not j.result.get("latency_samples"):
            continue
        seen.add(j.key)
        name = "fp32" if base is not None and j.key == base.key else j.label
        if best is not None and j.key == best.key:
            name = "chosen: " + name
        series.append((name, [v * factor for v in j.result["latency_samples"]]))
    if not series:
        return False
    series = series[:10]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(series) + 1.5))
    samples = [v for _, v in series]
    try:
        ax.boxplot(samples, orientation="horizontal", flierprops={"markersize": 2})
    except TypeError:  # matplotlib < 3.10
        ax.boxplot(samples, vert=False, flierprops={"markersize": 2})
    ax.set_yticks(range(1, len(series) + 1), [n for n, _ in series], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")  # a few scheduler hiccups are 100x the median on a busy machine
    ax.set_xlabel("batch-1 latency (ms, device; log scale)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)
