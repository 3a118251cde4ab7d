"""The seed's worked example, reproduced through edgeslim's API.

The seed trains a bias-free 2-4-1 sigmoid perceptron on XOR for 100 epochs with its own
update rule (gradient descent on half the summed squared error, learning rate 0.01), prunes
every weight with ``|w| < 0.01`` ("weight clipping"), quantizes the weights with
``round(w * 2) / 2`` and predicts the four XOR inputs. Here the same network is a small
float64 torch module whose training loop performs exactly the seed's update; the pruning is
``edgeslim.compress.prune.prune(threshold=0.01)`` and the quantization is
``edgeslim.compress.quantizer.level_quantize(levels=2)``. The example then shows what the
seed's min-max affine quantizer (``minmax_quantize``, 8 bits) gives on the same pruned model.

Run: ``.venv/bin/python examples/seed_perceptron.py``
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeslim.compress.prune import PruneResult, prune
from edgeslim.compress.quantizer import level_quantize, minmax_quantize

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
Y = np.array([[0], [1], [1], [0]], dtype=np.float64)


def initial_weights(
    seed: int = 0, input_size: int = 2, hidden_size: int = 4, output_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The seed's ``randn`` initial weights, drawn from ``np.random.default_rng(seed)``:
    ``weights1`` (input_size, hidden_size), then ``weights2`` (hidden_size, output_size)."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((input_size, hidden_size)),
        rng.standard_normal((hidden_size, output_size)),
    )


class SeedPerceptron(nn.Module):
    """The seed's perceptron: ``sigmoid(sigmoid(X @ weights1) @ weights2)``, float64, no bias.

    ``fc1.weight`` is the seed's ``weights1`` transposed (torch stores (out, in)), so edgeslim's
    pruner and quantizers see two ordinary ``nn.Linear`` layers.
    """

    def __init__(self, weights1: np.ndarray, weights2: np.ndarray):
        super().__init__()
        self.fc1 = nn.Linear(weights1.shape[0], weights1.shape[1], bias=False, dtype=torch.float64)
        self.fc2 = nn.Linear(weights2.shape[0], weights2.shape[1], bias=False, dtype=torch.float64)
        self.set_weights(weights1, weights2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x))))

    @torch.no_grad()
    def set_weights(self, weights1: np.ndarray, weights2: np.ndarray) -> None:
        self.fc1.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights1.T)))
        self.fc2.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights2.T)))

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weights1, weights2)`` in the seed's (in, out) layout, as numpy copies."""
        return (
            self.fc1.weight.detach().numpy().T.copy(),
            self.fc2.weight.detach().numpy().T.copy(),
        )

    @torch.no_grad()
    def train_seed(self, x: np.ndarray, y: np.ndarray, epochs: int, learning_rate: float) -> None:
        """The seed's full-batch update, line for line (``sigmoid'(s) = s (1 - s)``)."""
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(epochs):
            hidden = torch.sigmoid(self.fc1(xt))
            output = torch.sigmoid(self.fc2(hidden))
            output_delta = (yt - output) * output * (1 - output)
            hidden_delta = (output_delta @ self.fc2.weight) * hidden * (1 - hidden)
            self.fc2.weight += (hidden.T @ output_delta).T * learning_rate
            self.fc1.weight += (xt.T @ hidden_delta).T * learning_rate

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(x)).numpy()


@dataclass
class SeedRun:
    """Every number the example shows; weights are ``(weights1, weights2)`` in seed layout."""

    trained: tuple[np.ndarray, np.ndarray]
    trained_predictions: np.ndarray
    pruned: tuple[np.ndarray, np.ndarray]
    prune_result: PruneResult
    quantized: tuple[np.ndarray, np.ndarray]
    predictions: np.ndarray
    minmax: tuple[np.ndarray, np.ndarray]
    minmax_codes: tuple[np.ndarray, np.ndarray]
    minmax_predictions: np.ndarray


def run(
    seed: int = 0,
    epochs: int = 100,
    learning_rate: float = 0.01,
    threshold: float = 0.01,
    levels: int = 2,
    bits: int = 8,
) -> SeedRun:
    """Train, prune by threshold, level-quantize and predict as the seed does; then min-max."""
    model = SeedPerceptron(*initial_weights(seed))
    model.train_seed(X, Y, epochs, learning_rate)
    trained = model.weights()

    result = prune(model, threshold=threshold, progress=False)  # a pruned copy
    pruned_model = result.model
    pruned = pruned_model.weights()

    quantized_model = copy.deepcopy(pruned_model)
    quantized = (level_quantize(pruned[0], levels), level_quantize(pruned[1], levels))
    quantized_model.set_weights(*quantized)

    minmax_model = copy.deepcopy(pruned_model)
    qts = [minmax_quantize(w, bits) for w in pruned]
    minmax = (qts[0].dequantize(), qts[1].dequantize())
    minmax_model.set_weights(*minmax)

    return SeedRun(
        trained=trained,
        trained_predictions=model.predict(X),
        pruned=pruned,
        prune_result=result,
        quantized=quantized,
        predictions=quantized_model.predict(X),
        minmax=minmax,
        minmax_codes=(qts[0].q, qts[1].q),
        minmax_predictions=minmax_model.predict(X),
    )


def main() -> None:
    np.set_printoptions(precision=6, suppress=True)
    r = run()
    print("trained weights1:\n", r.trained[0], "\ntrained weights2:\n", r.trained[1])
    print("float predictions:", r.trained_predictions.ravel())
    res = r.prune_result
    print(
        f"\nprune(threshold=0.01): {res.params - res.nonzero_params} of {res.params} weights "
        f"zeroed, objective L = sum ||w - w~||^2 = {res.objective:.3g}"
    )
    print("\nquantized (round(w * 2) / 2) weights1:\n", r.quantized[0])
    print("quantized weights2:\n", r.quantized[1])
    print("predictions (the seed's output):\n", r.predictions)
    err = np.abs(r.predictions - r.trained_predictions).max()
    print(f"max |prediction - float prediction| = {err:.6f}")

    print("\nmin-max 8-bit codes weights1:\n", r.minmax_codes[0])
    print("weights2:\n", r.minmax_codes[1])
    print("min-max 8-bit dequantized weights1:\n", r.minmax[0], "\nweights2:\n", r.minmax[1])
    print("min-max 8-bit predictions:", r.minmax_predictions.ravel())
    werr = max(np.abs(a - b).max() for a, b in zip(r.minmax, r.pruned, strict=True))
    perr = np.abs(r.minmax_predictions - r.trained_predictions).max()
    print(f"max weight error {werr:.3g}, max |prediction - float prediction| = {perr:.3g}")


if __name__ == "__main__":
    main()
