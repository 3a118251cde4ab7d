"""``edgeslim demo``: the digits pipeline end to end, in about a minute."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

DEMO_RECIPE = {
    "name": "digits-cnn-demo",
    "steps": [
        {"prune": {"sparsity": 0.8, "scope": "global", "epochs": 3}},
        {"pack": {"bits": 5}},
    ],
}


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an --out-dir that cannot be a folder, before the demo's work."""
    from edgeslim._atomic import output_problem
    from edgeslim.errors import ConfigError

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file, not a folder.")
    problem = output_problem(out_dir, folder=True)
    if problem:
        raise ConfigError(f"Cannot make --out-dir {out_dir}: {problem}.")


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out_dir: Path | None = typer.Option(None, "--out-dir", help="keep the bundle here"),
    ) -> None:
        """Compress the built-in digits-cnn end to end, sign it, load it back, print a summary."""
        if out_dir is not None:
            _check_out_dir(out_dir)
        import numpy as np
        from rich.console import Console
        from rich.panel import Panel

        from edgeslim.bundle import generate_keypair
        from edgeslim.commands.compress import print_bundle_summary
        from edgeslim.edge.runtime import load
        from edgeslim.pipeline import compress
        from edgeslim.recipe import Recipe
        from edgeslim.recipe.run import render_table
        from edgeslim.zoo.digits import load_digits_split

        console = Console()
        console.print(Panel.fit(
            "edgeslim demo: digits-cnn (LeNet-5 scale, trained on scikit-learn digits)\n"
            "prune 80% of the weights globally + fine-tune -> export to ONNX -> 5-bit weight "
            "sharing -> signed .eslim bundle -> loaded back torch-free on onnxruntime",
            title="edgeslim",
        ))
        work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="edgeslim-demo-"))
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from edgeslim._atomic import output_problem
            from edgeslim.errors import ConfigError

            raise ConfigError(f"Cannot make --out-dir {work}: "
                              f"{output_problem(work, folder=True) or exc.strerror}.") from None
        from edgeslim.bundle.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE

        keys = work / "keys"
        key, pub = keys / PRIVATE_KEY_FILE, keys / PUBLIC_KEY_FILE
        if key.is_file() and pub.is_file():  # a key is never replaced
            console.print(f"signing with the key pair already in {keys}")
        elif key.exists() or pub.exists():
            from edgeslim.errors import ConfigError

            raise ConfigError(f"{keys} holds one of {PRIVATE_KEY_FILE} and {PUBLIC_KEY_FILE} "
                              f"but not both; give --out-dir a folder without a half key pair.")
        else:
            key, pub = generate_keypair(keys)
        recipe = Recipe.from_dict(DEMO_RECIPE)
        result = compress("digits-cnn", out=work / "digits-cnn.eslim", recipe=recipe,
                          sign_key=key)
        console.print(render_table(result.rows))
        print_bundle_summary(console, result)

        runner = load(result.bundle, public_key=pub)
        split = load_digits_split()
        logits = runner.run({"input": split.x_test})["logits"]
        acc = float((np.asarray(logits).argmax(1) == split.y_test).mean())
        console.print(
            f"[bold green]verified signature[/] and ran the bundle on onnxruntime: "
            f"test accuracy {acc * 100:.2f}% on {len(split.y_test)} held-out digits.\n"
            f"bundle: {result.bundle}  public key: {pub}\n"
            f"next: edgeslim inspect {result.bundle} --public-key {pub}\n"
            f"      edgeslim serve {result.bundle} --port 8080"
        )
