"""``edgeslim inspect``, ``edgeslim keygen`` and ``edgeslim sign``: bundles from the shell.

Exit codes: 0 ok; 2 a malformed, corrupt or hostile bundle (or bad arguments); 4 a signature
problem (missing or not verifying under ``--public-key``, unusable key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def _runtime_check(bundle: Any) -> dict[str, Any]:
    """Load the model in onnxruntime and run its probe; BundleError when either fails."""
    from edgeslim.errors import MissingDependencyError

    try:
        from edgeslim.edge.runtime import Runner

        runner = Runner(bundle, intra_op_num_threads=1)
    except MissingDependencyError as exc:
        return {"onnxruntime": f"not checked ({exc})", "probe": None}
    import onnxruntime

    worst = runner.probe()
    probe = None
    if worst is not None:
        probe = {"max_abs_error": worst, "atol": float(bundle.manifest["probe"].get("atol", 1e-3))}
    return {"onnxruntime": f"ok (onnxruntime {onnxruntime.__version__}, warm-up run passed)",
            "probe": probe}


def _fmt_shape(shape: list[Any]) -> str:
    return _esc("[" + ", ".join(str(d) for d in shape) + "]")


def _esc(text: Any) -> str:
    """Manifest text is data: escape it so rich never reads it as markup."""
    from rich.markup import escape

    return escape(str(text))


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return _esc(json.dumps(v, sort_keys=True))
    return _esc(v)


def _print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report["manifest"]
    console = Console(highlight=False)
    console.print(f"[bold]{_esc(m['name'])}[/]  version {_esc(m['version'])}  "
                  f"({_esc(m['task'])})  {_esc(report['path'])}")
    info = Table(show_header=False, box=None, pad_edge=False)
    info.add_column(style="cyan", no_wrap=True)
    info.add_column(overflow="fold")
    model, entries = m["model"], report["entries"]
    mz = entries["model.onnx"]
    info.add_row("format", m["format"])
    info.add_row("created", m["created"])
    info.add_row("bundle", f"{report['bundle_size']:,} bytes")
    info.add_row("model", f"model.onnx  {model['size']:,} bytes ({mz['compression']}, "
                          f"{mz['compressed_size']:,} in the zip)  opset {model.get('opset')}")
    info.add_row("sha256", model["sha256"])
    for name, meta in sorted(m.get("files", {}).items()):
        info.add_row("file", f"{_esc(name)}  {meta['size']:,} bytes  sha256 {meta['sha256']}")
    sig = report["signature"]
    if sig["verified"]:
        status = "[green]signed, verified[/] with the given public key"
    elif sig["present"]:
        status = "[yellow]signed, not verified[/] (pass --public-key to verify)"
    else:
        status = "[yellow]not signed[/]"
    info.add_row("signature", status)
    info.add_row("hashes", "[green]ok[/]")
    info.add_row("runtime", report["checks"]["onnxruntime"])
    probe = report["checks"]["probe"]
    if probe is not None:
        info.add_row("probe", f"ok (max abs error {probe['max_abs_error']:.3g} <= atol "
                              f"{probe['atol']:g})")
    if m.get("labels"):
        labels = m["labels"]
        shown = ", ".join(labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10
                                          else "")
        info.add_row("labels", _esc(shown))
    for key, val in sorted(m.get("provenance", {}).items()):
        info.add_row(f"provenance.{_esc(key)}", _fmt_value(val))
    console.print(info)

    io = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in m[kind]:
            io.add_row(kind[:-1], _esc(t["name"]), t["dtype"], _fmt_shape(t["shape"]))
    console.print(io)
    for key in ("preprocessing", "postprocessing"):
        steps = m.get(key) or []
        console.print(f"[bold]{key}[/]: " + ("none" if not steps else ""))
        for i, step in enumerate(steps):
            params = ", ".join(f"{_esc(k)}={_fmt_value(v)}" for k, v in sorted(step.items())
                               if k != "op")
            console.print(f"  {i + 1}. {_esc(step['op'])}" + (f"  ({params})" if params else ""))
    if m.get("metrics"):
        t = Table(title="metrics", title_justify="left")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in sorted(m["metrics"].items()):
            t.add_row(_esc(k), _fmt_value(v))
        console.print(t)
    if m.get("compression"):
        t = Table(title="compression steps", title_justify="left")
        for col in ("#", "step", "params", "metrics"):
            t.add_column(col)
        for i, step in enumerate(m["compression"]):
            t.add_row(str(i + 1), _esc(step["step"]), _fmt_value(step.get("params", {})),
                      _fmt_value(step.get("metrics", {})))
        console.print(t)


def _read_inputs(path: Path) -> Any:
    """The model inputs in ``path`` (.npy, .npz or .json), or a ConfigError saying why not."""
    import numpy as np

    from edgeslim.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"The inputs file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".json":  # numbers only, as the server's JSON payloads
            from edgeslim.edge.preprocess.sensor import parse_numbers

            doc = json.loads(path.read_text(encoding="utf-8"))
            arrays = {}
            for key, value in (doc.items() if isinstance(doc, dict) else [("", doc)]):
                arr, what = parse_numbers(value, allow_null=False)
                if arr is None:
                    where = f"input {key!r}" if key else "the array"
                    raise ConfigError(f"In {str(path)!r}, {where} holds {what}; give numbers.")
                arrays[key] = arr
            return arrays if isinstance(doc, dict) else arrays[""]
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"Cannot read the inputs file {str(path)!r}: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    raise ConfigError(f"The inputs file {str(path)!r} must be .npy, .npz or .json. Got "
                      f"{suffix or 'no suffix'!r}.")


def _check_npz_out(out: Path) -> None:
    from edgeslim._atomic import output_problem
    from edgeslim.errors import ConfigError

    if out.suffix.lower() != ".npz":
        raise ConfigError(f"-o takes a .npz file (the outputs by name). Got {str(out)!r}.")
    problem = output_problem(out)
    if problem:
        raise ConfigError(f"Cannot write {str(out)!r}: {problem}.")


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        bundle: Path = typer.Argument(..., help="The .eslim bundle to check and describe."),
        public_key: Path | None = typer.Option(
            None, "--public-key", help="Require a signature that verifies with this PEM key."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        no_run: bool = typer.Option(
            False, "--no-run", help="Skip loading the model in onnxruntime."
        ),
    ) -> None:
        """Verify a bundle (zip, sizes, sha256, signature, onnxruntime load, probe); show it."""
        from edgeslim.bundle import read_bundle

        b = read_bundle(bundle, public_key=public_key)  # a SignatureError exits 4
        checks = {"onnxruntime": "not checked (--no-run)", "probe": None}
        if not no_run:
            checks = _runtime_check(b)
        report = {
            "path": str(bundle),
            "bundle_size": bundle.stat().st_size,
            "manifest": b.manifest,
            "entries": {k: vars(v) for k, v in b.entries.items()},
            "signature": {"present": b.signed, "verified": b.verified},
            "checks": {"hashes": "ok", **checks},
        }
        if as_json:
            typer.echo(json.dumps(report, indent=2, sort_keys=True))
        else:
            _print_summary(report)

    @app.command("keygen")
    def keygen_cmd(
        out: Path = typer.Option(Path("."), "--out", help="Directory for the two key files."),
        force: bool = typer.Option(
            False, "--force", help="Replace existing key files (both together, or neither)."
        ),
    ) -> None:
        """Make an Ed25519 key pair: OUT/signing.key (private, 0600) and OUT/signing.pub.

        Existing key files are refused unless --force; the pair is replaced as a whole.
        """
        from edgeslim.bundle import generate_keypair

        key, pub = generate_keypair(out, force=force)
        typer.echo(f"private key: {key} (keep it secret; mode 600)")
        typer.echo(f"public key:  {pub} (give it to nodes: --public-key {pub})")

    @app.command("run")
    def run_cmd(
        bundle: Path = typer.Argument(..., help="The .eslim bundle to run."),
        inputs: Path = typer.Argument(
            ..., help="The inputs: .npy (a model with one input), .npz (arrays by input name) "
                      "or .json (an object of nested lists by input name, or one nested list)."),
        public_key: Path | None = typer.Option(
            None, "--public-key", help="Require a signature that verifies with this PEM key."),
        out: Path | None = typer.Option(
            None, "-o", "--out", help="Write the outputs to this .npz (default: JSON on "
                                      "stdout)."),
        cast: bool = typer.Option(
            False, "--cast", help="Convert .npy/.npz inputs to the model's dtypes where numpy's "
                                  "same-kind rule allows (float64 -> float32, int -> float); "
                                  "JSON inputs always are."),
    ) -> None:
        """Run a bundle on inputs from a file, as edgeslim.load(BUNDLE).run(INPUTS) does."""
        from edgeslim.edge.runtime import load

        feeds = _read_inputs(inputs)
        if out is not None:
            _check_npz_out(out)
        runner = load(bundle, public_key=public_key)  # a SignatureError exits 4
        # JSON numbers have no width: they are cast as --cast does
        outputs = runner.run(feeds, cast=cast or inputs.suffix.lower() == ".json")
        if out is None:
            typer.echo(json.dumps({k: v.tolist() for k, v in outputs.items()}))
            return
        import numpy as np

        from edgeslim._atomic import write_atomically, write_error_reason
        from edgeslim.errors import ConfigError

        try:
            write_atomically(out, lambda f: np.savez(f, **outputs))
        except OSError as exc:  # a full disk: found only now, after the run
            raise ConfigError(f"Cannot write {str(out)!r}: "
                              f"{write_error_reason(out, exc)}.") from None
        typer.echo(f"outputs {', '.join(outputs)}: {out}")

    @app.command("extract")
    def extract_cmd(
        bundle: Path = typer.Argument(..., help="The .eslim bundle to unpack."),
        dest: Path = typer.Argument(..., help="A new folder for its files (must not exist)."),
        public_key: Path | None = typer.Option(
            None, "--public-key", help="Require a signature that verifies with this PEM key."),
    ) -> None:
        """Check a bundle, then unpack manifest.json, model.onnx and its other files into DEST
        (whole or not at all), as edgeslim.bundle.extract_bundle does."""
        from edgeslim.bundle import extract_bundle

        path = extract_bundle(bundle, dest, public_key=public_key)
        typer.echo(f"extracted: {path}")

    @app.command("sign")
    def sign_cmd(
        bundle: Path = typer.Argument(..., help="The .eslim bundle to sign."),
        key: Path = typer.Option(..., "--key", help="The PEM private key (edgeslim keygen)."),
        out: Path | None = typer.Option(
            None, "-o", "--out", help="Write the signed bundle here (default: in place)."
        ),
    ) -> None:
        """Sign a bundle's manifest with an Ed25519 key (replaces any signature)."""
        from edgeslim.bundle import sign_bundle

        path = sign_bundle(bundle, key, out=out)
        typer.echo(f"signed: {path}")
