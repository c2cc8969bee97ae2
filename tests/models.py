"""Small real models for the tests: a Keras CNN trained on scikit-learn's digits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Digits:
    x_train: F32
    y_train: npt.NDArray[np.int64]
    x_test: F32
    y_test: npt.NDArray[np.int64]


@dataclass(frozen=True)
class TrainedModels:
    keras: Path
    tflite: Path
    onnx: Path
    digits: Digits


def load_digits() -> Digits:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y)
    return Digits(x_train, y_train, x_test, y_test)


def train_digits_cnn(out_dir: Path, epochs: int = 25, label_shift: int = 0) -> TrainedModels:
    """Train a small CNN (seconds) and write .keras, float .tflite and .onnx.

    ``label_shift`` trains on (label + shift) % 10: a model that disagrees on purpose.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    digits = load_digits()
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax", name="probs"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    labels = (digits.y_train + label_shift) % 10
    model.fit(digits.x_train, labels, epochs=epochs, batch_size=32, verbose=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_path = out_dir / "digits.keras"
    model.save(keras_path)
    tflite_path = out_dir / "digits.tflite"
    tflite_path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    onnx_path = out_dir / "digits.onnx"
    model(digits.x_test[:1])
    model.export(str(onnx_path), format="onnx", verbose=False)
    return TrainedModels(keras_path, tflite_path, onnx_path, digits)
