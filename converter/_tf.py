"""Import TensorFlow and Keras quietly, or say which extra to install."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

from converter.errors import MissingExtraError

__all__ = ["keras", "quiet_stdout", "tensorflow"]


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Keras export and the TFLite converter print to stdout; keep it for our report."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    warnings.filterwarnings("ignore", module="tensorflow")
    warnings.filterwarnings("ignore", category=FutureWarning, module="keras")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise MissingExtraError("tensorflow") from exc
    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tf


def keras() -> Any:
    tensorflow()
    try:
        import keras as k
    except ImportError as exc:
        raise MissingExtraError("keras") from exc
    return k
