"""``edgeslim optimize``, ``edgeslim report`` and ``edgeslim device-profile``.

``optimize`` exits 0 when the budget was met, 3 when it was not (the closest bundle is
written and its manifest names the failed constraints), 130 when interrupted (run the same
command again to resume).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import typer


class _Dashboard:
    """Live view of a search: time bar, current candidate, best so far (rich ``Live``)."""

    def __init__(self, budget_s: float, metric: str) -> None:
        self.budget_s = budget_s
        self.start = time.monotonic()
        self.metric = metric
        self.phase = "starting"
        self.current = ""
        self.done = 0
        self.cached = 0
        self.base: float | None = None
        self.best: tuple[str, float, float] | None = None  # label, metric, throughput

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.text import Text

        elapsed = time.monotonic() - self.start
        best = (f"best within drop so far: {self.best[0]} ({self.metric} {self.best[1]:.4f}, "
                f"{self.best[2]:,.0f}/s)" if self.best else "best so far: -")
        return Group(
            Text(f"{self.phase} | {elapsed:5.0f}/{self.budget_s:.0f} s | "
                 f"{self.done} built, {self.cached} from the store", style="bold"),
            ProgressBar(total=self.budget_s, completed=min(elapsed, self.budget_s), width=60),
            Text(self.current),
            Text(best),
        )


def _event_printer(console: Any, dash: _Dashboard, max_drop: float) -> Any:
    def on_event(kind: str, **info: Any) -> None:
        if kind == "phase":
            dash.phase = info["name"]
            console.print(f"[bold cyan]== {info['name']}[/]")
        elif kind == "start":
            dash.current = f"building {info['candidate'].label()} (~{info['estimate']:.0f} s)"
        elif kind in ("done", "cached"):
            ev = info["evaluated"]
            r = ev.result
            if dash.base is None:
                dash.base = r["metric"]
            if kind == "done":
                dash.done += 1
            else:
                dash.cached += 1
            if dash.base - r["metric"] <= max_drop + 1e-9 and (
                    dash.best is None or r["throughput"] > dash.best[2]):
                dash.best = (ev.candidate.label(), r["metric"], r["throughput"])
            dash.current = ""
            tag = "stored" if kind == "cached" else f"{r['seconds']:.1f} s"
            console.print(f"  {ev.candidate.label():<34} {r['metric']:.4f}  "
                          f"{r['latency_ms']:.4f} ms  {r['throughput']:>10,.0f}/s  "
                          f"{r['bundle_bytes'] / 1e6:.4f} MB  [dim]({tag})[/]")
        elif kind == "skip":
            console.print(f"  [yellow]skip[/] {info['candidate'].label()}: {info['reason']}")
        elif kind == "failed":
            console.print(f"  [red]failed[/] {info['candidate'].label()}: {info['error']}")
    return on_event


def _check_outputs(out: Path, run_dir: Path, *, report_given: bool) -> None:
    """Refuse a bundle path or report folder that cannot be written, before any work."""
    from edgeslim._atomic import output_problem
    from edgeslim.errors import ConfigError

    problem = output_problem(out)
    if problem:
        raise ConfigError(f"Cannot write the bundle -o {out}: {problem}.")
    what = (f"--report {run_dir}" if report_given else
            f"the report folder {run_dir} (the default for -o {out}; choose one with --report)")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{what[0].upper()}{what[1:]} is a file, not a folder.")
    problem = output_problem(run_dir, folder=True)
    if problem:
        raise ConfigError(f"Cannot make {what}: {problem}.")


def register(app: typer.Typer) -> None:
    @app.command("optimize")
    def optimize_cmd(
        model: str = typer.Argument(..., help="zoo name or package.module:callable"),
        data: str | None = typer.Option(
            None, "--data", help="digits | photos | sentences | package.module:callable "
                                 "returning a Workload: the data a package.module:callable "
                                 "model is judged on (zoo models bring their own)"),
        max_drop: float = typer.Option(..., "--max-drop",
                                       help="largest metric drop vs fp32 (0.01 = 1 point)"),
        out: Path = typer.Option(..., "-o", "--out", help="where to write the chosen bundle"),
        time_budget: str = typer.Option("10m", "--time-budget", help="e.g. 10m, 90s, 1h"),
        latency_ms: float | None = typer.Option(None, "--latency-ms",
                                                help="batch-1 latency ceiling on the device"),
        size_mb: float | None = typer.Option(None, "--size-mb",
                                             help="bundle size ceiling (MB = 10^6 bytes)"),
        report: Path | None = typer.Option(None, "--report",
                                           help="run directory: report + store "
                                                "(default OUT without .eslim + '.report')"),
        device_profile: Path | None = typer.Option(None, "--device-profile",
                                                   help="device profile (JSON/YAML)"),
        store: Path | None = typer.Option(
            None, "--store", help="SQLite results store (default REPORT/search.sqlite)"),
        threads: int = typer.Option(2, "--threads", help="onnxruntime and torch threads"),
        throughput_batch: int | None = typer.Option(
            None, "--throughput-batch", help="batch for throughput (default: 256 for small "
                                             "models, down to 8 for large ones)"),
        objective: str = typer.Option("throughput", "--objective",
                                      help="throughput | latency | size"),
        sign_key: Path | None = typer.Option(None, "--sign-key", help="Ed25519 private key"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no live progress"),
    ) -> None:
        """Search compression settings for the best bundle within a budget."""
        started = time.monotonic()  # the time budget covers the whole command
        # idle OpenMP threads of the trainer must not spin while onnxruntime is timed
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from rich.console import Console
        from rich.live import Live

        from edgeslim.optimize.api import optimize, parse_duration
        from edgeslim.optimize.report import candidates_table, load_run

        console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
        run_dir = report or out.with_name(out.name.removesuffix(".eslim") + ".report")
        _check_outputs(out, run_dir, report_given=report is not None)
        dash = _Dashboard(parse_duration(time_budget), "metric")
        live = Live(dash, console=console, refresh_per_second=4, transient=True) \
            if console.is_terminal and not quiet else None
        printer = _event_printer(live.console if live else console, dash, max_drop)
        events = None if quiet else printer
        try:
            if live:
                live.start()
            result = optimize(model, max_drop=max_drop, out=out, report_dir=run_dir,
                              latency_ms=latency_ms, size_mb=size_mb, time_budget=time_budget,
                              device_profile=device_profile, store=store, threads=threads,
                              objective=objective, sign_key=sign_key, on_event=events, data=data,
                              throughput_batch=throughput_batch, clock_start=started)
        except KeyboardInterrupt:
            if live:
                live.stop()
            console.print(f"[yellow]interrupted[/]: finished candidates are kept in "
                          f"{store or run_dir / 'search.sqlite'}; run the same command again "
                          "to resume.")
            raise typer.Exit(130) from None
        finally:
            if live and live.is_started:
                live.stop()
        out_console = Console(width=None if sys.stdout.isatty() else 150)
        out_console.print(candidates_table(load_run(result.store)))
        best = result.best
        if result.budget_met:
            out_console.print(f"[green]budget met[/]: {best.label} — drop "
                              f"{100 * best.drop:+.2f} pt, {best.latency_ms:.4f} ms, "
                              f"{best.throughput:,.0f}/s, {best.size_mb:.4f} MB")
        else:
            out_console.print(f"[red]budget NOT met[/] (failed: {', '.join(result.failed)}); "
                              f"wrote the closest: {best.label} — drop "
                              f"{100 * best.drop:+.2f} pt, {best.latency_ms:.4f} ms, "
                              f"{best.size_mb:.4f} MB")
        out_console.print(f"bundle: {result.bundle}")
        if result.report:
            out_console.print(f"report: {result.report}")
        if result.exit_code:
            raise typer.Exit(result.exit_code)

    @app.command("report")
    def report_cmd(
        run_dir: Path = typer.Argument(..., help="the --report directory of an optimize run"),
        store: Path | None = typer.Option(None, "--store", help="SQLite store (default "
                                                                "RUN_DIR/search.sqlite)"),
        run: int | None = typer.Option(None, "--run", help="run id (default: the latest)"),
    ) -> None:
        """Write RUN_DIR/index.html (tables + plots) from an optimize run's store."""
        from rich.console import Console

        from edgeslim.errors import ConfigError
        from edgeslim.optimize.report import candidates_table, load_run, write_report

        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"{run_dir} is a file, not a report folder: give the --report "
                              "folder of an optimize run.")
        page = write_report(run_dir, store=store, run_id=run)  # ConfigError if it cannot
        console = Console(width=None if sys.stdout.isatty() else 150)
        console.print(candidates_table(load_run(store or Path(run_dir) / "search.sqlite", run)))
        console.print(f"report: {page}")

    @app.command("device-profile")
    def device_profile_cmd(
        out: Path = typer.Option(..., "-o", "--out",
                                 help="profile file to write (JSON); an existing file is "
                                      "refused unless --force"),
        threads: int = typer.Option(2, "--threads", help="threads models run with here"),
        reference: str = typer.Option("digits-cnn", "--reference",
                                      help="digits-cnn | fleet-reference (torch-free)"),
        name: str | None = typer.Option(None, "--name", help="profile name"),
        force: bool = typer.Option(False, "--force",
                                   help="replace an existing file at --out"),
    ) -> None:
        """Measure this machine's reference latency and write a device profile.

        The file is written atomically; an existing file at --out is kept unless --force.
        """
        from edgeslim._validate import check_choice, check_int_range
        from edgeslim.optimize.profile import (
            REFERENCE_MODELS,
            check_profile_target,
            dump_profile,
            this_machine,
            write_profile,
        )

        check_choice(reference, "reference", "device-profile", REFERENCE_MODELS)
        check_int_range(threads, "threads", "device-profile", 1, 256)
        check_profile_target(out, force=force)  # before the measurement, not after
        text = dump_profile(this_machine(threads, reference=reference, name=name))
        write_profile(out, text + "\n", force=force)
        typer.echo(text)
