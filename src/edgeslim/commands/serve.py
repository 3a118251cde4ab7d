"""``edgeslim serve BUNDLE``: answer the Open Inference Protocol (KServe V2 REST) over HTTP.

Exit codes: 0 after a shutdown (Ctrl-C / SIGTERM, bounded by ``--drain``); 2 a bad bundle or
argument; 4 a signature problem under ``--public-key``.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from edgeslim.commands._token import read_token, token_option
from edgeslim.edge import DRAIN_S, MIN_BODY_MB

TOKEN_ENV = "EDGESLIM_TOKEN"


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        bundles: list[Path] = typer.Argument(..., help="One or more .eslim bundles to serve."),
        port: int = typer.Option(8000, "--port", "-p", min=0, max=65535,
                                 help="TCP port (0: any free port)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        token: str | None = token_option(
            TOKEN_ENV, "Require 'Authorization: Bearer TOKEN' (health checks stay open)."),
        max_batch: int = typer.Option(
            32, "--max-batch", min=1, max=65536,
            help="Most rows per batched model run (1: no batching)."),
        batch_window_ms: float = typer.Option(
            2.0, "--batch-window-ms", min=0.0,
            help="Most time a request waits for others to batch with (ms)."),
        inline_ms: float = typer.Option(
            4.0, "--inline-ms", min=0.0,
            help="Model runs expected to take at most this long run on the event loop; slower "
                 "ones in a worker thread, unless one client alone is connected (ms)."),
        max_body_mb: float = typer.Option(
            16.0, "--max-body-mb", min=MIN_BODY_MB,
            help=f"Largest request body (MB, at least {MIN_BODY_MB})."),
        threads: int = typer.Option(
            None, "--threads", min=1, max=256,
            help="onnxruntime intra-op threads per model (default: physical cores, at most 4)."),
        spin: bool = typer.Option(
            True, "--spin/--no-spin",
            help="Idle onnxruntime threads spin-wait for the next run: lower latency, but they "
                 "keep cores busy between requests (--no-spin on battery or shared cores)."),
        public_key: Path = typer.Option(
            None, "--public-key", help="Refuse bundles not signed with this Ed25519 key."),
        drain: float = typer.Option(
            DRAIN_S, "--drain", min=0.0,
            help="On SIGTERM or Ctrl-C, seconds the requests in flight get to finish before "
                 "the connections still open are closed; a second signal closes them at once."),
    ) -> None:
        """Serve bundles over HTTP: /v2/models/NAME/infer, /v2/health/*, /metrics."""
        from rich.console import Console

        from edgeslim.edge.server import EdgeServer

        token = read_token(token, TOKEN_ENV, "to serve without auth (load and unload off)")
        server = EdgeServer(  # a SignatureError exits 4 (its exit_code)
            [str(b) for b in bundles], host=host, port=port, token=token,
            public_key=str(public_key) if public_key is not None else None,
            max_batch=max_batch, batch_window_ms=batch_window_ms, inline_ms=inline_ms,
            max_body_mb=max_body_mb, threads=threads, spin=spin, drain_s=drain,
        )
        console = Console(stderr=True)
        auth = "bearer token required" if token else "no auth"

        def announce(url: str) -> None:  # once the port is ours, not before
            for m in server.models():
                console.print(f"serving {m['name']} version {m['version']} "
                              f"(batching {'on' if m['batching'] else 'off'})", highlight=False)
            console.print(f"listening on {url} ({auth}); pid {os.getpid()}", highlight=False)

        server.serve_forever(announce)
