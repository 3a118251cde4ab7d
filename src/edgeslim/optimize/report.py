"""The search report: ``RUN_DIR/index.html`` with tables and PNG plots (matplotlib, Agg).

Everything is rebuilt from the store (``RUN_DIR/search.sqlite``), so ``edgeslim report
RUN_DIR`` redraws a report at any time, also of an interrupted run. Plots:

- ``pareto.png``: metric against device latency, bundle size and throughput; the Pareto
  front (metric, latency, size) joined, the chosen bundle starred, the budget drawn as lines;
- ``sensitivity.png``: per-layer sensitivity: ptq's own per-layer int8 figures when a ptq
  candidate reported them, else the metric drop when one layer alone is pruned;
- ``sparsity.png``: per layer of the chosen bundle, the weights kept against the fp32 export
  (structured pruning) and the fraction of zeros among them (unstructured pruning);
- ``latency.png``: the spread of batch-1 latency samples of the baseline, the chosen bundle
  and the Pareto front.

A few lines of JavaScript mark the page ``data-images="loaded/total"`` once it has loaded,
and flag any image that failed to render (the test checks this in headless Chromium).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from edgeslim._atomic import write_atomically, write_error_reason
from edgeslim.errors import ConfigError
from edgeslim.optimize.select import Judged
from edgeslim.optimize.store import ResultStore

__all__ = ["candidates_table", "load_run", "write_report"]

_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
    else { imgs[i].insertAdjacentHTML('afterend', '<p class="bad">image missing</p>'); }
  }
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.best { background: #fff3c4; font-weight: bold; } tr.fail td.v { color: #b00; }
.ok { color: #070; font-weight: bold; } .bad { color: #b00; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


def load_run(store_path: str | os.PathLike[str], run_id: int | None = None) \
        -> dict[str, Any]:
    """The settings, outcome and judged candidates of a run (the latest one by default)."""
    from edgeslim.optimize.api import judge_run

    path = Path(store_path)
    if not path.is_file():
        raise ConfigError(f"No search store at {str(path)!r}: run 'edgeslim optimize ... "
                          "--report DIR' first, or give --store.")
    with ResultStore(path) as st:
        runs = st.runs()
        if not runs:
            raise ConfigError(f"The store {str(path)!r} holds no optimize run.")
        run = runs[-1] if run_id is None else next((r for r in runs if r["id"] == run_id), None)
        if run is None:
            raise ConfigError(f"No run {run_id!r} in {str(path)!r}. Runs: "
                              f"{', '.join(str(r['id']) for r in runs)}.")
        batch = (run["outcome"] or {}).get("throughput_batch") \
            or run["settings"].get("throughput_batch")
        judged, base = judge_run(st, run["model_hash"], run["settings"], batch=batch,
                                 until=run.get("finished"),
                                 size_overhead_mb=(run["outcome"] or {}).get(
                                     "size_overhead_mb", 0.0))
        sensitivity = st.get_meta(run["model_hash"], "sensitivity")
        rows = st.candidates(run["model_hash"])
    outcome = run["outcome"] or {}
    best = next((j for j in judged if j.key == outcome.get("best")), None)
    if best is None and judged:
        from edgeslim.optimize.select import pick

        best = pick(judged, run["settings"]["objective"])
    return {"run": run, "settings": run["settings"], "outcome": outcome, "judged": judged,
            "throughput_batch": outcome.get("throughput_batch")
            or run["settings"].get("throughput_batch") or "?",
            "base": base, "best": best, "sensitivity": sensitivity or [],
            "failed_rows": [r for r in rows if r.status == "failed"],
            "evaluations": sum(r.evaluations for r in rows)}


def candidates_table(data: dict[str, Any]) -> Any:
    """The candidates as a rich Table (what the CLI prints)."""
    from rich.table import Table

    s = data["settings"]
    metric = s["metric_name"]
    table = Table(title=f"optimize {s['model']}: {len(data['judged'])} candidates "
                        f"(device: {(s.get('profile') or {}).get('name', 'this machine')})")
    for col in ("candidate", metric, "drop (pt)", "latency ms", "throughput/s", "size MB",
                "budget", "pareto"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    best = data["best"]
    for j in sorted(data["judged"], key=lambda j: j.latency_ms):
        mark = "[bold]*[/] " if best is not None and j.key == best.key else ""
        verdict = "[green]met[/]" if j.meets else "[red]" + ",".join(j.failed) + "[/]"
        table.add_row(mark + j.label, f"{j.metric:.4f}", f"{100 * j.drop:+.2f}",
                      f"{j.latency_ms:.4f}", f"{j.throughput:,.0f}", f"{j.size_mb:.4f}",
                      verdict, "yes" if j.pareto else "")
    return table


def write_report(run_dir: str | os.PathLike[str], *, store: str | os.PathLike[str] | None = None,
                 run_id: int | None = None) -> Path:
    """Write ``run_dir/index.html`` and its PNGs; return the page's path."""
    run_dir = Path(run_dir)
    data = load_run(store or run_dir / "search.sqlite", run_id)
    from edgeslim.optimize import plots

    page = run_dir / "index.html"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        images = []
        for name, fn in (("pareto.png", plots.plot_pareto),
                         ("sensitivity.png", plots.plot_sensitivity),
                         ("sparsity.png", plots.plot_sparsity),
                         ("latency.png", plots.plot_latency)):
            if fn(data, run_dir / name):
                images.append(name)
        html_text = _html(data, images).encode("utf-8")
        summary = json.dumps(_summary(data), indent=2).encode("utf-8")
        write_atomically(page, lambda f: f.write(html_text))
        write_atomically(run_dir / "summary.json", lambda f: f.write(summary))
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else run_dir
        raise ConfigError(f"Cannot write the report in {run_dir}: "
                          f"{write_error_reason(where, exc)}.") from None
    return page


def _summary(data: dict[str, Any]) -> dict[str, Any]:
    best: Judged | None = data["best"]
    return {"settings": data["settings"], "outcome": data["outcome"],
            "best": best.row() if best else None,
            "baseline": data["base"].row() if data["base"] else None,
            "candidates": [j.row() for j in data["judged"]]}


def _e(v: Any) -> str:
    return html.escape(str(v))


def _verdict(data: dict[str, Any]) -> str:
    best: Judged | None = data["best"]
    outcome = data["outcome"]
    if outcome.get("error"):
        return (f'<p class="bad">This run failed after the search: no bundle was written '
                f'({_e(outcome["error"])}). Run the same command again once the cause is '
                f'fixed; finished candidates are read back from the store.</p>')
    if outcome.get("interrupted") or "bundle" not in outcome:
        what = ("was interrupted" if outcome.get("interrupted") else
                "has not finished (it is still running, or it stopped without saying why)")
        so_far = ""
        if best is not None:
            state = "meets the budget" if best.meets else "fails " + ", ".join(best.failed)
            so_far = f" The best candidate so far is {_e(best.label)}, which {_e(state)}."
        return (f'<p class="bad">This run {what}: no bundle was written.{so_far} Run the same '
                f'command again to resume; finished candidates are read back from the '
                f'store.</p>')
    if best is None:
        return '<p class="bad">No candidate finished.</p>'
    if best.meets:
        return '<p class="ok">Budget met.</p>'
    names = {"max_drop": "metric drop", "latency_ms": "latency", "size_mb": "size"}
    failed = ", ".join(names.get(f, f) for f in best.failed)
    return (f'<p class="bad">Budget NOT met: no candidate satisfied every constraint. The '
            f'closest one was written; it fails: {_e(failed)} '
            f'(failed constraints: {_e(", ".join(best.failed))}).</p>')


def _html(data: dict[str, Any], images: list[str]) -> str:
    s, o = data["settings"], data["outcome"]
    b = s["budget"]
    metric = s["metric_name"]
    best: Judged | None = data["best"]
    base: Judged | None = data["base"]
    prof = s.get("profile") or {}
    limits = [f"max drop {b['max_drop']:g} ({100 * b['max_drop']:g} pt)"]
    if b.get("latency_ms"):
        limits.append(f"latency &le; {b['latency_ms']:g} ms")
    if b.get("size_mb"):
        limits.append(f"size &le; {b['size_mb']:g} MB")
    settings_rows = [
        ("model", s["model"]), ("metric", metric), ("budget", "; ".join(limits)),
        ("time budget", f"{b['time_s']:g} s"), ("objective", s["objective"]),
        ("device", f"{prof.get('name', 'this machine')} (latency factor {s['factor']:.3f})"),
        ("threads here", s["threads"]), ("throughput batch", data["throughput_batch"]),
        ("search time", f"{o.get('elapsed_s', 0):.0f} s" if o.get("elapsed_s") else "-"),
        ("evaluations (all runs)", data["evaluations"]),
        ("bundle written", o.get("bundle", "-")),
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>edgeslim optimize: {_e(s['model'])}</title><style>{_CSS}</style>",
        f"<script>{_CHECK_JS}</script></head><body>",
        f"<h1>edgeslim optimize: {_e(s['model'])}</h1>", _verdict(data),
        "<table>" + "".join(
            f"<tr><th class='l'>{_e(k)}</th><td class='l'>{v if k == 'budget' else _e(v)}"
            "</td></tr>" for k, v in settings_rows) + "</table>",
    ]
    if best is not None and base is not None:
        parts.append("<h2>Chosen bundle</h2>"
                     + _table([base, best], metric, best, ["fp32", "chosen"]))
    parts.append("<h2>Pareto front and all candidates</h2>")
    if "pareto.png" in images:
        parts.append("<img src='pareto.png' alt='Pareto front'>")
    parts.append(_table(sorted(data["judged"], key=lambda j: j.latency_ms), metric, best))
    for title, img in (("Per-layer sensitivity", "sensitivity.png"),
                       ("Sparsity per layer (chosen bundle)", "sparsity.png"),
                       ("Latency distribution (batch 1)", "latency.png")):
        if img in images:
            parts.append(f"<h2>{title}</h2><img src='{img}' alt='{_e(title)}'>")
    if data["sensitivity"]:
        cols = [k for k in data["sensitivity"][0] if k != "layer"]

        def cell(v: Any) -> str:
            return f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{_e(v)}</td>"

        parts.append("<table><tr><th class='l'>layer</th>" + "".join(
            f"<th>{_e(c)}</th>" for c in cols) + "</tr>" + "".join(
            "<tr><td class='l'>" + _e(r["layer"]) + "</td>"
            + "".join(cell(r.get(c)) for c in cols) + "</tr>" for r in data["sensitivity"])
            + "</table>")
    notes = [*(o.get("skipped") or []), *(o.get("failed_candidates") or [])]
    if notes:
        parts.append("<h2>Skipped or failed candidates</h2><ul>" + "".join(
            f"<li>{_e(n.splitlines()[0])}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(rows: list[Judged], metric: str, best: Judged | None,
           names: list[str] | None = None) -> str:
    head = ["candidate", metric, "drop (pt)", "latency ms", "throughput/s", "size MB",
            "budget", "pareto", "build s"]
    out = ["<table><tr>" + "".join(
        f"<th class='{'l' if h == 'candidate' else ''}'>{_e(h)}</th>" for h in head) + "</tr>"]
    for i, j in enumerate(rows):
        cls = "best" if best is not None and j.key == best.key else ("fail" if not j.meets else "")
        label = f"{names[i]}: {j.label}" if names else j.label
        verdict = "met" if j.meets else "fails " + ", ".join(j.failed)
        secs = j.result.get("seconds")
        out.append(
            f"<tr class='{cls}'><td class='l'>{_e(label)}</td><td>{j.metric:.4f}</td>"
            f"<td>{100 * j.drop:+.2f}</td><td>{j.latency_ms:.4f}</td>"
            f"<td>{j.throughput:,.0f}</td><td>{j.size_mb:.4f}</td>"
            f"<td class='v'>{_e(verdict)}</td><td>{'yes' if j.pareto else ''}</td>"
            f"<td>{'' if secs is None else f'{secs:.1f}'}</td></tr>")
    out.append("</table>")
    return "".join(out)
