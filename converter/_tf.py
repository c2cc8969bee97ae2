"""Import TensorFlow and Keras quietly, or say which extra to install."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from edgefleet.converter.errors import MissingExtraError

__all__ = ["keras", "quiet_stdout", "tensorflow"]


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence what Keras export and the TFLite converter print, from Python and from C++.

    Both file descriptors 1 and 2 point at /dev/null meanwhile; progress shown by
    the CLI goes to its own duplicate of stderr, so it stays visible.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


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
