"""What the outside view 14c found in the converter's hints and names: every ONNX Runtime
load failure told to re-export at another opset, recipe failures told to try another recipe
(F24); a Keras conv net of dynamic height and width offered an ONNX export that failed, with
TensorFlow's ANSI codes in the message (F20); a two-input Keras model's TFLite inputs named
after TensorFlow's internals, and --int8-io silently ignored (F26). Tiny models made here,
no mocks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtime.errors import RuntimeLoadError
from edgefleet.agent.runtime.onnx import load_hint
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.errors import DataError, NoResultError
from edgefleet.converter.failures import exception_text, first_lines
from tests.conftest import Keys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

vi = helper.make_tensor_value_info
OPSET_HINT = "re-export the model with an opset this runtime supports"


def _model(graph: onnx.GraphProto, opset: int = 17, ir: int = 8) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return bytes(model.SerializeToString())


def _matmul(outputs: list[onnx.ValueInfoProto], nodes: list[onnx.NodeProto] | None = None
            ) -> onnx.GraphProto:
    weight = numpy_helper.from_array(
        (np.random.default_rng(0).standard_normal((16, 32)) * 0.3).astype(np.float32), "W")
    return helper.make_graph(nodes or [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                             [vi("x", TensorProto.FLOAT, ["N", 16])], outputs, [weight])


def _refusal(model: bytes) -> RuntimeLoadError:
    with pytest.raises(RuntimeLoadError) as refused:
        load_runtime(model, "onnx")
    return refused.value


# --- F24: the opset hint only where ONNX Runtime speaks of a version ---------------------------

@pytest.mark.parametrize(("opset", "ir"), [(99, 8), (17, 99)])
def test_an_opset_or_ir_version_refusal_keeps_the_opset_hint(opset: int, ir: int) -> None:
    error = _refusal(_model(_matmul([vi("y", TensorProto.FLOAT, ["N", 32])]), opset, ir))
    assert OPSET_HINT in str(error)


def test_refusals_about_something_else_name_it_and_not_the_opset() -> None:
    duplicate = _matmul([vi("y", TensorProto.FLOAT, ["N", 32])],
                        [helper.make_node("MatMul", ["x", "W"], ["y"]),
                         helper.make_node("Relu", ["x"], ["y"])])
    typed = helper.make_graph([helper.make_node("Sqrt", ["i"], ["o"])], "g",
                              [vi("i", TensorProto.INT64, ["N"])],
                              [vi("o", TensorProto.INT64, ["N"])])
    for model in (_model(duplicate), _model(typed)):
        error = str(_refusal(model))
        assert OPSET_HINT not in error and "opset" not in error.lower()
        assert "ONNX Runtime says:" in error and "export it again" in error


def test_a_source_onnx_runtime_refuses_is_said_once_with_the_fix_that_fits(
        signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.converter.errors import SourceModelError
    from edgefleet.converter.pipeline import convert

    typed = helper.make_graph([helper.make_node("Sqrt", ["i"], ["o"])], "g",
                              [vi("i", TensorProto.INT64, ["N", 4])],
                              [vi("o", TensorProto.INT64, ["N", 4])])
    model = tmp_path / "typed.onnx"
    model.write_bytes(_model(typed))
    with pytest.raises(SourceModelError) as refused:
        convert(ConvertConfig(model=model, output=tmp_path / "o.efb", format="onnx",
                              sign_key=signing_keys.secret, quiet=True))
    error = refused.value
    assert error.message.count("Type Error") == 1 and "ONNX Runtime says" not in error.message
    assert error.hint.startswith("check the model with onnx.checker.check_model")
    assert OPSET_HINT not in str(error)


@pytest.mark.parametrize(("said", "opset"), [
    ("ONNX Runtime only *guarantees* support for models stamped with official released onnx "
     "opset versions. Opset 25 is under development", True),
    ("[ONNXRuntimeError] : 1 : FAIL : Unsupported model IR version: 13, max supported IR "
     "version: 11", True),
    ("Load model from m.onnx failed: ai.onnx.ml version 6 is not supported", True),
    ("[ONNXRuntimeError] : 1 : FAIL : This is an invalid model. Error: Duplicate definition "
     "of name (x).", False),
    ("[ONNXRuntimeError] : 1 : FAIL : model_path must not be empty. Ensure that a path is "
     "provided when the model is created or loaded.", False),
])
def test_load_hint_reads_what_onnx_runtime_said(said: str, opset: bool) -> None:
    hint = load_hint(said)
    assert (hint == OPSET_HINT) is opset
    if not opset:
        assert hint.startswith("ONNX Runtime says: ") and "[ONNXRuntimeError]" not in hint
        assert said.split(" : ")[-1][:40] in hint


def _passthrough(path: Path) -> Path:
    """Legal ONNX: the graph input is listed as a graph output too."""
    path.write_bytes(_model(_matmul([vi("y", TensorProto.FLOAT, ["N", 32]),
                                     vi("x", TensorProto.FLOAT, ["N", 16])])))
    return path


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_a_recipe_failing_on_an_input_listed_as_output_names_it_and_offers_none(
        signing_keys: Keys, tmp_path: Path, mode: str) -> None:
    from edgefleet.converter.pipeline import convert

    model = _passthrough(tmp_path / "pt.onnx")
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(4).standard_normal((40, 16)).astype(np.float32))

    def config(quantize: str) -> ConvertConfig:
        return ConvertConfig(model=model, output=tmp_path / f"{quantize}.efb",
                             sign_key=signing_keys.secret, format="onnx",
                             quantize=quantize,  # type: ignore[arg-type]
                             calibration=data, quiet=True)

    with pytest.raises(NoResultError) as refused:
        convert(config(mode))
    error = refused.value
    text = f"{error.message} {error.hint}"
    assert OPSET_HINT not in text and "another --quantize" not in text
    assert "try another" not in text and "use another --quantize recipe" not in text
    assert "the graph lists its input 'x' as an output too" in error.hint
    assert "--quantize none packages the model as it is" in error.hint
    assert convert(config("none")).chosen == "none", "the hint's --quantize none works"


# --- F20: a Keras conv net of dynamic height and width to ONNX -----------------------------------

def _dynamic_conv(path: Path, kernel: int = 3) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((None, None, 3), name="img")
    x = keras.layers.Conv2D(4, kernel, activation="relu")(image)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x) if kernel == 3 else x
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(image, keras.layers.Dense(3, name="logits")(x)).save(path)
    return path


def test_a_dynamic_keras_conv_net_exports_to_onnx_as_the_tflite_hint_offers(
        signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.converter.pipeline import convert

    model = _dynamic_conv(tmp_path / "dyn.keras")
    data = tmp_path / "img.npy"
    np.save(data, np.random.default_rng(0).random((12, 32, 32, 3), dtype=np.float32))
    common = {"model": model, "sign_key": signing_keys.secret, "calibration": data,
              "quiet": True}
    with pytest.raises(DataError) as refused:
        convert(ConvertConfig(output=tmp_path / "t.efb", **common))  # type: ignore[arg-type]
    assert refused.value.hint.startswith("pass --input-size HEIGHTxWIDTH")
    assert "--format onnx" in refused.value.hint
    report = convert(ConvertConfig(output=tmp_path / "o.efb", format="onnx",
                                   **common))  # type: ignore[arg-type]
    assert report.chosen == "none" and report.input_shapes["img"] == [-1, -1, -1, 3]


def test_an_onnx_export_failing_at_the_traced_size_says_input_size_without_ansi(
        signing_keys: Keys, tmp_path: Path) -> None:
    """A 300x300 kernel: the export's tracing size (224) is too small, the deployment size
    is not."""
    from edgefleet.converter.pipeline import convert

    model = _dynamic_conv(tmp_path / "big.keras", kernel=300)
    data = tmp_path / "img.npy"
    np.save(data, np.random.default_rng(0).random((2, 320, 320, 3), dtype=np.float32))
    with pytest.raises(NoResultError) as refused:
        convert(ConvertConfig(model=model, output=tmp_path / "o.efb", format="onnx",
                              sign_key=signing_keys.secret, eval=data, quiet=True))
    error = refused.value
    assert "ONNX export failed:" in error.message and "Computed output size" in error.message
    assert "\x1b" not in error.message and "\n" not in error.message
    assert "pass --input-size HxW (the deployment size)" in error.hint


def test_exception_text_drops_ansi_codes() -> None:
    exc = RuntimeError("Exception encountered.\n\n\x1b[1m{{node}} Computed output size "
                       "would be negative\x1b[0m\n")
    assert "\x1b" not in exception_text(exc)
    assert first_lines(exc, count=2) == "Exception encountered. {{node}} Computed output " \
                                        "size would be negative"


# --- F26: a two-input Keras model's TFLite inputs take the source's names --------------------

@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import keras

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("two")
    a, b = keras.Input((16,), name="a"), keras.Input((8,), name="b")
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([a, b]))
    keras.Model({"a": a, "b": b}, {"score": keras.layers.Dense(1, name="score")(hidden),
                                   "vec": keras.layers.Dense(4, name="vec")(hidden)}
                ).save(folder / "two.keras")
    rng = np.random.default_rng(0)
    np.savez(folder / "two.npz", a=rng.standard_normal((40, 16)).astype(np.float32),
             b=rng.standard_normal((40, 8)).astype(np.float32))
    return folder / "two.keras", folder / "two.npz"


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_tflite_inputs_carry_the_keras_names_in_order(
        signing_keys: Keys, tmp_path: Path, two_inputs: tuple[Path, Path], mode: str) -> None:
    from edgefleet.agent.protocol.bundle import read_bundle
    from edgefleet.converter.pipeline import convert

    model, data = two_inputs
    out = tmp_path / "two.efb"
    convert(ConvertConfig(model=model, output=out, sign_key=signing_keys.secret,
                          quantize=mode,  # type: ignore[arg-type]
                          calibration=data, quiet=True))
    bundle = read_bundle(out, signing_keys.trusted)
    assert [i.name for i in bundle.manifest.inputs] == ["a", "b"]
    assert [o.name for o in bundle.manifest.outputs] == ["score", "vec"]
    runtime = load_runtime(bundle.model_bytes, "tflite")
    assert [i.name for i in runtime.inputs] == ["a", "b"]
    feeds = dict(np.load(data))
    got = runtime.run({"a": feeds["a"][:1], "b": feeds["b"][:1]})
    assert set(got) == {"score", "vec"} and got["vec"].shape == (1, 4)


# --- F26 (low): --int8-io where it cannot act is refused; auto says when its choice ignores it -

@pytest.mark.parametrize("mode", ["none", "fp16", "dynamic", "weight-only", "int8-a16"])
def test_int8_io_with_a_mode_that_keeps_float_io_is_refused(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ValueError, match=f"--int8-io .* --quantize {mode} keeps them float"):
        ConvertConfig(model=tmp_path / "m.keras", output=tmp_path / "o.efb",
                      sign_key=tmp_path / "k", quantize=mode,  # type: ignore[arg-type]
                      int8_io=True)


def test_auto_with_int8_io_warns_when_the_chosen_result_has_float_io(
        tmp_path: Path, two_inputs: tuple[Path, Path]) -> None:
    from edgefleet.converter.pipeline import _float_io_kept
    from edgefleet.converter.sources import load_source
    from edgefleet.converter.tflite_backend import to_tflite

    source = load_source(two_inputs[0])
    floats = to_tflite(source, "dynamic")
    config = ConvertConfig(model=two_inputs[0], output=tmp_path / "o.efb",
                           sign_key=tmp_path / "k", quantize="auto", int8_io=True)
    [warning] = _float_io_kept(config, "dynamic", floats)
    assert warning.startswith("--int8-io: the chosen result dynamic has float inputs/outputs")
    assert _float_io_kept(ConvertConfig(model=two_inputs[0], output=tmp_path / "o.efb",
                                        sign_key=tmp_path / "k", quantize="auto"),
                          "dynamic", floats) == []
