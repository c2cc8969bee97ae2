"""Magnitude pruning of Keras 3 models: per-layer masks, optionally a masked fine-tune.

Each prunable layer (Dense, Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D)
keeps the weights of largest magnitude so that the layer reaches the target
sparsity. With fine-tuning data the model trains a few epochs while the masks
are re-applied after every batch, so pruned weights stay zero. Biases are not
pruned. Zeros compress: the report gives the gzip size of the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.converter._tf import keras
from edgefleet.converter.data import Dataset
from edgefleet.converter.errors import DataError

__all__ = ["PruneResult", "prune_keras"]

_PRUNABLE = ("Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D")
Epoch = Callable[[int, int, float], None]  # epoch, epochs, loss


@dataclass
class PruneResult:
    model: Any
    sparsity: float
    per_layer: dict[str, float] = field(default_factory=dict)
    fine_tuned_epochs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"sparsity": round(self.sparsity, 4),
                "per_layer": {k: round(v, 4) for k, v in self.per_layer.items()},
                "fine_tuned_epochs": self.fine_tuned_epochs}


def _kernels(layer: Any) -> list[Any]:
    return [w for w in layer.trainable_weights if "bias" not in w.path and len(w.shape) > 1]


def _masks(model: Any, sparsity: float) -> dict[str, np.ndarray[Any, Any]]:
    masks = {}
    for layer in model.layers:
        if type(layer).__name__ not in _PRUNABLE:
            continue
        for weight in _kernels(layer):
            values = np.abs(np.asarray(weight.numpy()))
            cut = np.quantile(values, sparsity) if values.size > 1 else -1.0
            masks[weight.path] = (values > cut).astype(values.dtype)
    return masks


def _apply(model: Any, masks: dict[str, np.ndarray[Any, Any]]) -> None:
    for layer in model.layers:
        for weight in _kernels(layer):
            mask = masks.get(weight.path)
            if mask is not None:
                weight.assign(np.asarray(weight.numpy()) * mask)


def _sparsity(model: Any, masks: dict[str, np.ndarray[Any, Any]]) -> tuple[float, dict[str, float]]:
    per_layer, zeros, total = {}, 0, 0
    for layer in model.layers:
        for weight in _kernels(layer):
            if weight.path in masks:
                values = np.asarray(weight.numpy())
                per_layer[weight.path] = float((values == 0).mean())
                zeros, total = zeros + int((values == 0).sum()), total + values.size
    return (zeros / total if total else 0.0), per_layer


def prune_keras(model: Any, sparsity: float, fine_tune: Dataset | None = None,
                epochs: int = 4, on_epoch: Epoch = lambda *_: None) -> PruneResult:
    """Prune a copy of ``model`` to ``sparsity``; fine-tune with masks when data is given."""
    k = keras()
    pruned = k.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    masks = _masks(pruned, sparsity)
    _apply(pruned, masks)
    tuned = 0
    if fine_tune is not None:
        tuned = _fine_tune(k, pruned, masks, fine_tune, epochs, on_epoch)
    overall, per_layer = _sparsity(pruned, masks)
    return PruneResult(pruned, overall, per_layer, tuned)


def _fine_tune(k: Any, model: Any, masks: dict[str, np.ndarray[Any, Any]], data: Dataset,
               epochs: int, on_epoch: Epoch) -> int:
    if data.labels is None:
        raise DataError("fine-tuning data has no labels",
                        hint="save the class indices as 'labels' in the .npz")

    class KeepMasks(k.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            _apply(model, masks)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            on_epoch(epoch + 1, epochs, float((logs or {}).get("loss", 0.0)))

    inputs = list(data.inputs.values())
    sample = np.asarray(model(inputs[0][:4] if len(inputs) == 1 else [i[:4] for i in inputs]))
    probabilities = bool(np.allclose(sample.sum(axis=-1), 1.0, atol=1e-3) and sample.min() >= 0)
    loss = k.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
    model.compile(optimizer=k.optimizers.Adam(1e-3), loss=loss)
    model.fit(inputs[0] if len(inputs) == 1 else inputs, data.labels, epochs=epochs,
              batch_size=32, verbose=0, callbacks=[KeepMasks()])
    _apply(model, masks)
    return epochs
