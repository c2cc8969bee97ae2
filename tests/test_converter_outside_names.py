"""What the outside tester found still open in the converter: output names, an int8 source
quantized again, hints that are true for operators no option makes integer, load failures
that say what is wrong, and option clashes. Each on a small trained model or a published
one (mediapipe's, from its PyPI wheel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.errors import NoResultError, SourceModelError, TargetViolationError
from edgefleet.converter.pipeline import convert
from tests import wheel_models
from tests.conftest import Keys
from tests.models import TrainedModels


def _config(model: Path, out: Path, keys: Keys, **kw: object) -> ConvertConfig:
    return ConvertConfig(model=model, output=out, sign_key=keys.secret, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def digits_npz(digits_models: TrainedModels,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("names-data")
    d = digits_models.digits
    np.savez(out / "calib.npz", x=d.x_train[:100])
    np.savez(out / "one.npz", x=d.x_train[:1])
    np.savez(out / "eval.npz", x=d.x_test[:200], labels=d.y_test[:200])
    return {"calibration": out / "calib.npz", "one": out / "one.npz", "eval": out / "eval.npz"}


def _output_names(bundle: Path, keys: Keys) -> list[str]:
    return [t.name for t in read_bundle(bundle, keys.trusted).manifest.outputs]


# --- 1. full int8 of a float TFLite keeps the source's output names ---------------------------

def test_int8_of_a_float_tflite_keeps_the_source_output_names(
        tmp_path: Path, signing_keys: Keys, people: tuple[Path, Path]) -> None:
    """ai-edge-quantizer's full int8 named mediapipe's face detector outputs
    ``regressors_dequant`` and ``classificators_dequant``."""
    path = wheel_models.model("face-detection")
    source = [t.name for t in load_runtime(path.read_bytes(), "tflite").outputs]
    out = tmp_path / "face.efb"
    report = convert(_config(path, out, signing_keys, quantize="int8", calibration=people[0],
                             eval=people[1], scale="-1-1", max_drop=100.0))
    assert report.chosen == "int8" and len(source) == 2
    assert _output_names(out, signing_keys) == source
    assert not any(name.endswith("_dequant") for name in _output_names(out, signing_keys))


# --- 2. Keras outputs carry the model's names ------------------------------------------------

@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_a_keras_model_s_outputs_are_named_after_its_output_layer(
        digits_models: TrainedModels, digits_npz: dict[str, Path], signing_keys: Keys,
        tmp_path: Path, fmt: str) -> None:
    """Were ``StatefulPartitionedCall_1:0`` (TFLite) and ``Identity:0`` (ONNX) in the
    bundle, and ``keras_tensor_19`` in the report."""
    out = tmp_path / f"digits-{fmt}.efb"
    report = convert(_config(digits_models.keras, out, signing_keys, format=fmt,
                             eval=digits_npz["eval"]))
    assert _output_names(out, signing_keys) == ["probs"]
    assert [k["name"] for k in report.output_kinds] == ["probs"]


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_a_three_output_keras_model_keeps_its_output_order_and_names(
        signing_keys: Keys, tmp_path: Path, fmt: str) -> None:
    """The TFLite converter put the outputs of [3], [1] and [5] numbers in another order:
    named by position, "zeta" would have been the 1-number output."""
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, name="hidden")(x)
    model = keras.Model(x, [keras.layers.Dense(n, name=name)(hidden)
                            for name, n in (("zeta", 3), ("alpha", 1), ("mid", 5))])
    model.save(tmp_path / "three.keras")
    np.savez(tmp_path / "three.npz",
             x=np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32))
    out = tmp_path / "three.efb"
    convert(_config(tmp_path / "three.keras", out, signing_keys, format=fmt,
                    eval=tmp_path / "three.npz"))
    outputs = read_bundle(out, signing_keys.trusted).manifest.outputs
    assert [(t.name, t.shape[1:]) for t in outputs] == [("zeta", [3]), ("alpha", [1]),
                                                        ("mid", [5])]


def test_a_functional_keras_model_s_output_names_are_its_own() -> None:
    import keras

    from edgefleet.converter.sources import keras_output_names

    image = keras.Input((4,), name="image")
    hidden = keras.layers.Dense(3, name="hidden")(image)
    model = keras.Model(image, [keras.layers.Dense(2, name="box")(hidden),
                                keras.layers.Dense(1, name="score")(hidden)])
    assert keras_output_names(model) == ("box", "score")
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="logits")])
    assert keras_output_names(sequential) == ("logits",)


# --- 3. an int8 source quantized again --------------------------------------------------------

@pytest.fixture(scope="module")
def int8_source(digits_models: TrainedModels, digits_npz: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.sources import load_source
    from edgefleet.converter.tflite_backend import to_tflite

    keras = load_source(digits_models.keras)
    path = tmp_path_factory.mktemp("int8-source") / "digits-int8.tflite"
    path.write_bytes(to_tflite(keras, "int8", load_dataset(digits_npz["calibration"],
                                                           keras.inputs)))
    return path


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_an_int8_source_quantized_again_is_refused_as_not_smaller_and_says_so(
        int8_source: Path, digits_npz: dict[str, Path], signing_keys: Keys, tmp_path: Path,
        mode: str) -> None:
    """Was accepted and written as "dynamic" (120 bytes of repacking smaller), though
    nothing was quantized."""
    with pytest.raises(NoResultError) as refused:
        convert(_config(int8_source, tmp_path / "again.efb", signing_keys, quantize=mode,
                        calibration=digits_npz["calibration"], eval=digits_npz["eval"]))
    report, error = refused.value.report, refused.value
    [attempt] = report.attempts
    assert report.source_quantized and not attempt.accepted
    assert "did not make the model smaller" in attempt.reason
    assert "quantized already" in error.message and "quantized already" in attempt.recipe
    assert "--quantize none" in (error.hint or "")
    [suggestion] = report.suggestions
    assert suggestion["option"] == "--quantize none"
    assert not (tmp_path / "again.efb").exists()


def test_the_hint_for_an_int8_source_packages_it_as_it_is(
        int8_source: Path, digits_npz: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    out = tmp_path / "kept.efb"
    report = convert(_config(int8_source, out, signing_keys, quantize="none",
                             eval=digits_npz["eval"]))
    bundle = read_bundle(out, signing_keys.trusted)
    assert bundle.files["model.tflite"] == int8_source.read_bytes()
    assert bundle.manifest.optimization.quantization == "source (quantized already)"
    assert report.source_accuracy is not None and report.source_accuracy > 0.9


def test_auto_on_an_int8_source_packages_it_as_it_is_and_says_why(
        int8_source: Path, digits_npz: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    report = convert(_config(int8_source, tmp_path / "auto.efb", signing_keys, quantize="auto",
                             calibration=digits_npz["calibration"], eval=digits_npz["eval"]))
    assert [a.label for a in report.attempts] == ["none"] and report.chosen == "none"
    assert any("quantized already" in w for w in report.warnings)


# --- 4. an operator no option makes integer: the hint says change the model ------------------

@pytest.mark.parametrize("int8_io", [False, True])
def test_prelu_left_float_on_coral_gets_a_hint_to_change_the_model_not_an_option(
        tmp_path: Path, signing_keys: Keys, people: tuple[Path, Path], int8_io: bool) -> None:
    """mediapipe's face landmarks (PRELU): the hint offered --int8-io, then --quantize
    auto, and neither makes PRELU integer (auto keeps more in float)."""
    model = wheel_models.model("face-landmark")
    with pytest.raises(NoResultError) as refused:
        convert(_config(model, tmp_path / "coral.efb", signing_keys, quantize="int8",
                        calibration=people[0], eval=people[1], scale="-1-1",
                        targets=("coral-edgetpu",), int8_io=int8_io, max_drop=100.0))
    cause, report = refused.value.cause, refused.value.report
    assert isinstance(cause, TargetViolationError)
    assert report.attempts[0].float_ops == ["PRELU"]
    assert "PRELU computes in float" in cause.message
    hint = cause.hint or ""
    assert "no converter option lifts it" in hint and "PRELU by ReLU" in hint
    assert "--int8-io" not in hint and "--quantize auto" not in hint
    assert not {s["option"] for s in report.suggestions} & {"--quantize auto",
                                                             "--quantize int8 --int8-io"}


def test_the_keras_original_of_a_prelu_model_converts_prelu_to_int8(
        digits_npz: dict[str, Path], tmp_path: Path) -> None:
    """What the PRELU hint says of the Keras original holds: the TFLite converter writes
    an integer PRELU."""
    import keras

    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.sources import load_source
    from edgefleet.converter.tflite_backend import to_tflite
    from edgefleet.converter.tflite_graph import float_ops

    keras.utils.set_random_seed(0)
    keras.Sequential([keras.Input((8, 8, 1), name="image"), keras.layers.Conv2D(4, 3),
                      keras.layers.PReLU(), keras.layers.Flatten(),
                      keras.layers.Dense(10, name="probs")]).save(tmp_path / "prelu.keras")
    source = load_source(tmp_path / "prelu.keras")
    quantized = to_tflite(source, "int8", load_dataset(digits_npz["calibration"],
                                                        source.inputs), int8_io=True)
    from edgefleet.agent.runtime.inspect import inspect_model

    assert "PRELU" in inspect_model(quantized, "tflite").ops and float_ops(quantized) == []


# --- 5. load failures that say what is wrong --------------------------------------------------

def test_an_onnx_model_without_inputs_is_refused_by_name(signing_keys: Keys,
                                                        tmp_path: Path) -> None:
    """Was "list index out of range"."""
    import onnx
    from onnx import TensorProto, helper

    constant = helper.make_node("Constant", [], ["y"], value=helper.make_tensor(
        "v", TensorProto.FLOAT, [1, 2], [1.0, 2.0]))
    graph = helper.make_graph([constant], "constant", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "constant.onnx")
    with pytest.raises(SourceModelError) as refused:
        convert(_config(tmp_path / "constant.onnx", tmp_path / "x.efb", signing_keys,
                        format="onnx"))
    assert "constant.onnx has no inputs" in refused.value.message
    assert "index" not in refused.value.message
    assert "graph input" in (refused.value.hint or "")


@pytest.mark.timeout(300)
def test_a_keras_lambda_layer_is_named_and_its_hint_converts_the_model(
        signing_keys: Keys, tmp_path: Path) -> None:
    """Was Keras' own text with the hint "check that the file is complete"."""
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="x")
    doubled = keras.layers.Lambda(lambda v: v * 2.0)(x)
    keras.Model(x, keras.layers.Dense(2, name="score")(doubled)).save(tmp_path / "lam.keras")
    with pytest.raises(SourceModelError) as refused:
        convert(_config(tmp_path / "lam.keras", tmp_path / "x.efb", signing_keys))
    assert "Lambda layer" in refused.value.message and "safe mode" in refused.value.message
    hint = refused.value.hint or ""
    assert "safe_mode=False" in hint and "model.export(FOLDER)" in hint
    assert "complete" not in hint
    # the hint, done: loaded where the code is, exported, converted
    loaded = keras.models.load_model(tmp_path / "lam.keras", safe_mode=False)
    loaded.export(str(tmp_path / "lam_saved"), verbose=False)
    report = convert(_config(tmp_path / "lam_saved", tmp_path / "lam.efb", signing_keys))
    assert report.output is not None and report.source_kind == "savedmodel"


@pytest.mark.parametrize("kind", ["keras", "onnx", "tflite"])
def test_a_truncated_model_file_is_called_cut_short_with_the_fix(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path, kind: str) -> None:
    """Were "File not found" (Keras, for a file that is there), and the runtime's hints
    to convert for another runtime version or upgrade it."""
    whole = getattr(digits_models, kind)
    cut = tmp_path / f"cut{whole.suffix}"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    with pytest.raises(SourceModelError) as refused:
        convert(_config(cut, tmp_path / "x.efb", signing_keys,
                        format="onnx" if kind == "onnx" else "tflite"))
    message, hint = refused.value.message, refused.value.hint or ""
    assert "cut short" in message and f"({cut.stat().st_size} bytes)" in message
    assert "download it again" in hint and "export the model again" in hint
    assert "not found" not in message and "upgrade" not in str(refused.value)


# --- 6. option clashes and thin calibration ---------------------------------------------------

def test_input_shape_and_input_size_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--input-shape and --input-size both given"):
        ConvertConfig(model=tmp_path / "m.onnx", output=tmp_path / "m.efb",
                      sign_key=tmp_path / "k", input_shapes=(("x", (1, 3, 64, 64)),),
                      input_size=(64, 64))


def test_the_cli_refuses_input_shape_with_input_size_in_one_line(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.cli import app

    result = CliRunner().invoke(app, [
        "convert", str(digits_models.onnx), "-o", str(tmp_path / "x.efb"), "--format", "onnx",
        "--sign-key", str(signing_keys.secret), "--input-shape", "image=1x8x8x1",
        "--input-size", "8x8"])
    assert result.exit_code == 2, result.output
    assert "--input-shape and --input-size both given" in result.output
    assert not (tmp_path / "x.efb").exists()


def test_calibration_with_a_single_sample_warns(
        digits_models: TrainedModels, digits_npz: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    report = convert(_config(digits_models.tflite, tmp_path / "one.efb", signing_keys,
                             quantize="int8", calibration=digits_npz["one"],
                             eval=digits_npz["eval"], max_drop=100.0))
    [warning] = [w for w in report.warnings if "calibration has" in w]
    assert "calibration has 1 sample:" in warning and "100 or more" in warning
    enough = convert(_config(digits_models.tflite, tmp_path / "many.efb", signing_keys,
                             quantize="int8", calibration=digits_npz["calibration"],
                             eval=digits_npz["eval"], max_drop=100.0))
    assert not [w for w in enough.warnings if "calibration has" in w]
