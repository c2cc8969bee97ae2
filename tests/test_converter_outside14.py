"""What an outside tester found when attacking ``edgefleet convert`` (issue 14's models):
labels that judged one output and let every other be wrong, non-finite data, dict and
scalar outputs, a bad ``-o`` path, unbounded input sizes. Each on a tiny ONNX graph made
here (or a tiny Keras model), no mocks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtime.base import TensorInfo
from edgefleet.cli.convert import _worst
from edgefleet.converter.advice import failure
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.data import load_dataset
from edgefleet.converter.errors import DataError, NoResultError, UnsupportedPathError
from edgefleet.converter.evaluate import agreement
from edgefleet.converter.judge import agreement_drop, points_above
from edgefleet.converter.pipeline import convert
from edgefleet.converter.report import Attempt, ConversionReport, Verdict
from tests.conftest import Keys

WIDTH = 128


def _config(model: Path, out: Path, keys: Keys, **kw: object) -> ConvertConfig:
    return ConvertConfig(model=model, output=out, sign_key=keys.secret, format="onnx",
                         **kw)  # type: ignore[arg-type]


def _two_heads(path: Path) -> Path:
    """Inputs ``a`` and ``b``; outputs ``flag`` ([N, 1], from ``b``) first, then ``scores``
    ([N, 10], from ``a``): labels index the second output."""
    rng = np.random.default_rng(0)
    wa = numpy_helper.from_array(rng.normal(size=(WIDTH, 10)).astype(np.float32), "Wa")
    wb = numpy_helper.from_array(rng.normal(size=(WIDTH, 1)).astype(np.float32), "Wb")
    wh = numpy_helper.from_array(rng.normal(size=(WIDTH, WIDTH)).astype(np.float32), "Wh")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["b", "Wh"], ["h"]),
         helper.make_node("MatMul", ["h", "Wb"], ["flag"]),
         helper.make_node("MatMul", ["a", "Wa"], ["scores"])], "two_heads",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", WIDTH]) for n in "ab"],
        [helper.make_tensor_value_info("flag", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])], [wa, wb, wh])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _scores_of(a: np.ndarray) -> np.ndarray:
    wa = np.random.default_rng(0).normal(size=(WIDTH, 10)).astype(np.float32)
    return np.asarray((a @ wa).argmax(axis=1))


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Calibration where ``b`` is narrow (its int8 range clips every evaluation value) and
    ``a`` as wide as the evaluation; labels the source gets right."""
    out = tmp_path_factory.mktemp("heads")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, WIDTH)).astype(np.float32)
    np.savez(out / "cal.npz", a=a[:100], b=rng.uniform(0, 0.01, (100, WIDTH)).astype(np.float32))
    b_eval = rng.normal(scale=10, size=(100, WIDTH)).astype(np.float32)
    labels = _scores_of(a[100:])
    np.savez(out / "eval.npz", a=a[100:], b=b_eval, labels=labels)
    np.savez(out / "eval_oob.npz", a=a[100:], b=b_eval, labels=labels + 10)
    return {"model": _two_heads(out / "heads.onnx"), "cal": out / "cal.npz",
            "eval": out / "eval.npz", "oob": out / "eval_oob.npz"}


# --- 1. labels judge one output; every output must still agree --------------------------------

def test_labels_do_not_let_a_badly_wrong_output_through(heads: dict[str, Path],
                                                        signing_keys: Keys,
                                                        tmp_path: Path) -> None:
    """The labelled output lost little accuracy, ``flag`` was clipped to the calibration
    range: the bundle was written with exit 0."""
    out = tmp_path / "heads.efb"
    with pytest.raises(NoResultError) as caught:
        convert(_config(heads["model"], out, signing_keys, quantize="int8",
                        calibration=heads["cal"], eval=heads["eval"], max_drop=5.0))
    attempt, source = caught.value.report.attempts[0], caught.value.report.source_accuracy
    assert source == 1.0 and attempt.accuracy is not None and attempt.accuracy >= 0.96
    assert attempt.agreement["worst_output"] == "flag" and attempt.agreement["worst_score"] < 0.95
    assert attempt.accuracy_drop_points is not None and attempt.accuracy_drop_points > 5
    assert "flag" in attempt.reason and not out.exists()


def test_labels_index_the_first_output_that_is_a_vector_of_scores(
        heads: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    """The first output is [N, 1]: labels were compared with its argmax (always 0)."""
    report = convert(_config(heads["model"], tmp_path / "f.efb", signing_keys,
                             eval=heads["eval"]))
    assert report.source_accuracy == 1.0
    kinds = {k["name"]: k["kind"] for k in report.output_kinds}
    assert kinds == {"flag": "regression", "scores": "class"}


def test_labels_beyond_the_output_s_classes_are_refused(heads: dict[str, Path],
                                                       signing_keys: Keys,
                                                       tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"100 of 100 labels are outside 0\.\.9.*'scores'"):
        convert(_config(heads["model"], tmp_path / "o.efb", signing_keys, eval=heads["oob"]))


def test_a_result_that_never_agrees_is_called_unusable_not_offered_a_max_drop(
        heads: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    """Calibrated on inputs 1000x narrower than the evaluation's: the hint offered
    ``--max-drop 100.1``, which wrote a model of about chance accuracy."""
    with np.load(heads["cal"]) as archive:
        np.savez(tmp_path / "narrow.npz", a=archive["a"] / 1000, b=archive["b"])
    with pytest.raises(NoResultError) as caught:
        convert(_config(heads["model"], tmp_path / "u.efb", signing_keys, quantize="int8",
                        calibration=tmp_path / "narrow.npz", eval=heads["eval"]))
    drop = caught.value.report.attempts[0].accuracy_drop_points
    assert drop is not None and drop >= 50
    hint = caught.value.cause.hint
    assert "unusable" in hint and "--max-drop" not in hint


# --- 2. non-finite data, and the CLI's table of a NaN -----------------------------------------

def test_nan_in_calibration_is_refused_naming_the_input_and_the_count(
        heads: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    with np.load(heads["cal"]) as archive:
        a, b = archive["a"].copy(), archive["b"].copy()
    b[3, :2], a[5, 0] = np.nan, np.inf
    np.savez(tmp_path / "nan.npz", a=a, b=b)
    out = tmp_path / "nan.efb"
    out.write_bytes(b"an earlier bundle")
    with pytest.raises(DataError, match=r"input 'a' has 1 non-finite"):
        convert(_config(heads["model"], out, signing_keys, quantize="int8",
                        calibration=tmp_path / "nan.npz", max_drop=100.0))
    assert out.read_bytes() == b"an earlier bundle"


def test_the_cli_table_shows_a_nan_output_as_not_finite() -> None:
    """A NaN is written as null in the report: the table raised TypeError after the bundle
    step."""
    row = {"name": "y", "score": None, "max_abs_error": None, "judged_range": 1.0,
           "judged_by": "range", "centered_cosine": None, "rel_rms": None}
    assert _worst({"outputs": [row, {**row, "name": "z", "score": 0.5, "max_abs_error": 0.1,
                                     "centered_cosine": 0.5, "rel_rms": 0.1}]}) == \
        "y: not finite"


# --- 3. scalar and dict outputs -------------------------------------------------------------

def test_a_scalar_output_of_a_fixed_batch_model_converts(signing_keys: Keys,
                                                         tmp_path: Path) -> None:
    """A rank-0 output (one number a call) raised IndexError in the evaluation."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)], "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "scalar.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((9, 3)).astype(np.float32))
    out = tmp_path / "scalar.efb"
    report = convert(_config(tmp_path / "scalar.onnx", out, signing_keys,
                             calibration=tmp_path / "x.npy"))
    assert out.exists() and report.attempts[0].agreement["worst_score"] == 1.0


def test_a_keras_model_of_dict_outputs_converts_in_its_order(signing_keys: Keys,
                                                             tmp_path: Path) -> None:
    from edgefleet.converter._tf import keras

    k = keras()
    x = k.Input((6,), name="features")
    h = k.layers.Dense(8, activation="relu")(x)
    k.Model(x, {"flag": k.layers.Dense(1, activation="sigmoid", name="flag")(h),
                "vec": k.layers.Dense(12, name="vec")(h)}).save(tmp_path / "dict.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((16, 6)).astype(np.float32))
    out = tmp_path / "dict.efb"
    report = convert(ConvertConfig(model=tmp_path / "dict.keras", output=out,
                                   sign_key=signing_keys.secret, calibration=tmp_path / "x.npy"))
    assert out.exists()
    assert [k["name"] for k in report.output_kinds] == ["flag", "vec"]
    assert report.attempts[0].agreement["worst_score"] > 0.999


# --- 8. a bad -o path fails before any work --------------------------------------------------

@pytest.mark.parametrize("where", ["folder", "no parent"])
def test_a_bad_output_path_is_refused_before_converting(heads: dict[str, Path],
                                                        signing_keys: Keys, tmp_path: Path,
                                                        where: str) -> None:
    out = tmp_path if where == "folder" else tmp_path / "missing" / "x.efb"
    # the model path does not exist either: the output is checked first
    with pytest.raises(DataError, match="is a folder" if where == "folder" else
                       "does not exist") as caught:
        convert(_config(tmp_path / "absent.onnx", out, signing_keys))
    assert caught.value.hint


# --- 10. input sizes are bounded; 13. --max-drop at most 100 ----------------------------------

@pytest.mark.parametrize("kw", [{"input_size": (100000, 100000)},
                                {"input_shapes": (("x", (1, 3, 6000, 6000)),)},
                                {"max_drop": 100.1}])
def test_unbounded_options_are_refused(tmp_path: Path, kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="above|0 to 100"):
        ConvertConfig(model=tmp_path / "m.onnx", output=tmp_path / "m.efb",
                      sign_key=tmp_path / "k", **kw)  # type: ignore[arg-type]


# --- 5. an ONNX model of a fixed batch above 1 calibrates in calls of that batch ------------

def _fixed_batch(path: Path, batch: int) -> Path:
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(WIDTH, 64)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 64])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_a_fixed_batch_of_two_calibrates_in_calls_of_two(signing_keys: Keys, tmp_path: Path,
                                                         mode: str) -> None:
    """ONNX Runtime refused calibration one row a call ("Got: 1 Expected: 2")."""
    source = _fixed_batch(tmp_path / "two.onnx", 2)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).random((9, WIDTH)).astype(np.float32))
    out = tmp_path / f"two-{mode}.efb"
    report = convert(_config(source, out, signing_keys, quantize=mode,
                             calibration=tmp_path / "x.npy", max_drop=100.0))
    assert report.attempts[0].verdict.value == "accepted" and out.exists()


def test_auto_tells_recipes_that_failed_from_recipes_that_missed() -> None:
    from edgefleet.converter.report import Attempt, Verdict
    from edgefleet.converter.search import _stays_float

    crashed, missed = Attempt("int8", "int8", []), Attempt("fp16", "fp16", [])
    crashed.verdict, missed.verdict = Verdict.FAILED, Verdict.OVER_BUDGET
    note = _stays_float([crashed, missed])
    assert "fp16 missed the budget" in note and "int8 failed with an error" in note


# --- 7. 16-bit, EXIF-turned and transparent images; 9. a decompression bomb ------------------

def _gray(spec_shape: tuple[int, ...]) -> list[TensorInfo]:
    return [TensorInfo(name="image", shape=spec_shape, dtype="float32")]


def test_a_16_bit_png_is_scaled_not_saturated(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "sixteen"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(folder / "mid.png")
    data = load_dataset(folder, _gray((-1, 8, 8, 1)))
    assert data.inputs["image"].max() == pytest.approx(128 / 255, abs=1 / 255)  # was 1.0


def test_an_exif_rotated_photo_is_turned_upright(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "exif"
    folder.mkdir()
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # left half white, stored 8 wide and 4 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(folder / "turned.jpg", exif=exif, quality=100)
    image = load_dataset(folder, _gray((-1, 8, 4, 3))).inputs["image"][0]  # 8 high, 4 wide
    assert image[:4].mean() > 0.9 and image[4:].mean() < 0.1  # white on top once turned


def test_a_transparent_image_is_composited_on_black(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "rgba"
    folder.mkdir()
    pixels = np.full((8, 8, 4), 255, dtype=np.uint8)
    pixels[..., 3] = 0  # white, fully transparent
    Image.fromarray(pixels, "RGBA").save(folder / "clear.png")
    assert load_dataset(folder, _gray((-1, 8, 8, 3))).inputs["image"].max() == 0.0


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "bomb"
    folder.mkdir()
    Image.new("L", (1000, 1000)).save(folder / "bomb.png")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # a 1000x1000 image is then twice past the bomb limit
    try:
        with pytest.raises(DataError, match="bomb.png"):
            load_dataset(folder, _gray((-1, 8, 8, 1)))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# --- 9. token ids beyond the vocabulary -------------------------------------------------------

def test_token_ids_beyond_the_vocabulary_are_refused_naming_the_input(
        signing_keys: Keys, tmp_path: Path) -> None:
    """ONNX Runtime's Gather raised InvalidArgument as a traceback."""
    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(100, 8))
                                    .astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vectors"])], "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 12])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["N", 12, 8])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "tokens.onnx")
    ids = np.random.default_rng(1).integers(0, 100, size=(20, 12))
    ids[4, 3] = 968
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(DataError, match=r"input 'ids' \(int64\) holds 0\.\.968"):
        convert(_config(tmp_path / "tokens.onnx", tmp_path / "t.efb", signing_keys,
                        calibration=tmp_path / "ids.npy"))


# --- 11. a time-major ONNX input ([seq, batch, feat]) ------------------------------------------

def test_a_time_major_onnx_input_is_refused_naming_its_dims(signing_keys: Keys,
                                                            tmp_path: Path) -> None:
    """Dim 0 (the sequence) was taken as the samples, silently."""
    rng = np.random.default_rng(0)
    hidden, feat = 8, 4
    weights = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in
               (("W", (1, 4 * hidden, feat)), ("R", (1, 4 * hidden, hidden)))]
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["X", "W", "R"], ["Y", "Y_h"], hidden_size=hidden)],
        "time_major", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                     ["seq", "batch", feat])],
        [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, "batch", hidden])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "lstm.onnx")
    np.save(tmp_path / "x.npy", rng.normal(size=(20, 1, feat)).astype(np.float32))
    with pytest.raises(UnsupportedPathError, match=r"'X' has dims \['seq', 'batch', '4'\]"):
        convert(_config(tmp_path / "lstm.onnx", tmp_path / "l.efb", signing_keys,
                        calibration=tmp_path / "x.npy"))


def test_a_dynamic_dim_after_the_samples_reads_any_not_n(heads: dict[str, Path],
                                                         tmp_path: Path) -> None:
    spec = [TensorInfo(name="x", shape=(-1, -1, 16), dtype="float32")]
    np.save(tmp_path / "x.npy", np.zeros((3, 5, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"expects shape \['N', 'any', 16\]"):
        load_dataset(tmp_path / "x.npy", spec)


# --- 14. --int8-io with ONNX; 15. --input-shape on a two-input Keras model; 16. a comma typo --

def test_int8_io_with_onnx_is_refused(tmp_path: Path) -> None:
    """Was silently ignored, and the lineage said int8_io true for float32 I/O."""
    with pytest.raises(ValueError, match="--int8-io.*--format tflite"):
        ConvertConfig(model=tmp_path / "m.onnx", output=tmp_path / "m.efb",
                      sign_key=tmp_path / "k", format="onnx", int8_io=True)


def test_input_shape_on_a_two_input_keras_model_says_it_is_not_applied(
        signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.converter._tf import keras

    k = keras()
    a, b = k.Input((None, None, 3), name="img_a"), k.Input((None, None, 3), name="img_b")
    pooled = [k.layers.GlobalAveragePooling2D()(x) for x in (a, b)]
    k.Model([a, b], k.layers.Add()(pooled)).save(tmp_path / "two.keras")
    with pytest.raises(DataError, match="--input-shape / --input-size is not applied to a "
                                        "keras model of 2 inputs"):
        convert(ConvertConfig(model=tmp_path / "two.keras", output=tmp_path / "two.efb",
                              sign_key=signing_keys.secret,
                              input_shapes=(("img_a", (1, 8, 8, 3)), ("img_b", (1, 8, 8, 3)))))


def test_a_comma_typo_names_the_input_and_the_fix() -> None:
    import typer

    from edgefleet.cli.convert import _shape

    with pytest.raises(typer.BadParameter, match=r"'--input-shape input=1,3,40,48'.*"
                                                 r"--input-shape input=1x3x40x48"):
        _shape("input=1,3,40,48")


# --- 12. a Keras model returning the same tensor twice ----------------------------------------

def test_one_tensor_returned_twice_gets_two_names_in_the_bundle_and_its_health_data(
        signing_keys: Keys, tmp_path: Path) -> None:
    """Both TFLite outputs were named ``y_1``; the health data held one of them."""
    from edgefleet.agent.protocol.bundle import read_bundle
    from edgefleet.converter._tf import keras

    k = keras()
    x = k.Input((6,), name="x")
    y = k.layers.Dense(8, name="y")(k.layers.Dense(16, activation="relu")(x))
    k.Model(x, [y, y]).save(tmp_path / "dup.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((64, 6)).astype(np.float32))
    out = tmp_path / "dup.efb"
    convert(ConvertConfig(model=tmp_path / "dup.keras", output=out, sign_key=signing_keys.secret,
                          quantize="int8", calibration=tmp_path / "x.npy", max_drop=100.0))
    bundle = read_bundle(out, signing_keys.trusted)
    names = [t.name for t in bundle.manifest.outputs]
    assert names == ["y_0", "y_1"]
    with np.load(io.BytesIO(bundle.files["health.npz"])) as health:
        stored = sorted(health.files)
    assert {"output/y_0", "output/y_1"} <= set(stored)


# --- 14b A. -o naming a file the conversion reads, or a device, is refused before any work ---

@pytest.mark.parametrize("clash", ["model", "sign_key", "calibration", "eval", "device"])
def test_an_output_that_would_replace_an_input_or_a_device_is_refused(
        heads: dict[str, Path], signing_keys: Keys, tmp_path: Path, clash: str) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: -o is checked first")
    data = tmp_path / "d.npy"
    np.save(data, np.zeros((2, WIDTH), np.float32))
    out = {"model": tmp_path / "." / "m.onnx", "sign_key": signing_keys.secret,
           "calibration": data, "eval": data, "device": Path("/dev/null")}[clash]
    kw = {"calibration": data} if clash == "calibration" else \
        {"eval": data} if clash == "eval" else {}
    before = out.read_bytes() if out.is_file() else None
    with pytest.raises(DataError, match="not a regular file" if clash == "device" else
                       "writing the bundle would replace it") as caught:
        convert(_config(model, out, signing_keys, **kw))
    assert caught.value.hint
    if before is not None:
        assert out.read_bytes() == before


# --- 14b B. a source whose own outputs overflow is refused up front -------------------------

def _exp_overflow(path: Path) -> Path:
    """``x @ 30 -> exp -> @ W``: inputs near 1 overflow float32 (exp(120))."""
    w1 = numpy_helper.from_array(np.full((4, 8), 30.0, np.float32), "W1")
    w2 = numpy_helper.from_array(np.ones((8, 2), np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Exp", ["h"], ["e"]),
         helper.make_node("MatMul", ["e", "W2"], ["y"])], "exp_overflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("which", ["calibration", "eval"])
def test_a_source_giving_nan_or_inf_is_refused_naming_the_output_and_the_count(
        signing_keys: Keys, tmp_path: Path, which: str) -> None:
    model = _exp_overflow(tmp_path / "exp.onnx")
    small = np.full((6, 4), 0.01, np.float32)  # exp(1.2): finite
    overflowing = small.copy()
    overflowing[:2] = 1.0  # two samples of exp(120)
    np.save(tmp_path / "ok.npy", small)
    np.save(tmp_path / "bad.npy", overflowing)
    kw = {"calibration": tmp_path / "bad.npy"} if which == "calibration" else \
        {"calibration": tmp_path / "ok.npy", "eval": tmp_path / "bad.npy"}
    with pytest.raises(DataError, match=r"NaN/inf on 2 of 6 .*output 'y'") as caught:
        convert(_config(model, tmp_path / "m.efb", signing_keys, quantize="int8", **kw))
    assert "scale the inputs" in (caught.value.hint or "")
    assert not (tmp_path / "m.efb").exists()


def test_float64_data_beyond_float32_says_it_overflows(tmp_path: Path) -> None:
    np.save(tmp_path / "huge.npy", np.full((3, 4), 1e300))
    with pytest.raises(DataError, match="12 float64 values beyond the float32 range"):
        load_dataset(tmp_path / "huge.npy", [TensorInfo("x", (-1, 4), "float32")])


# --- 14b C. a small output that is noise is unusable, whatever points its range score costs --

@pytest.mark.parametrize("noise", [1.0, 0.3])
def test_a_small_output_of_noise_is_called_unusable_not_offered_a_max_drop(
        tmp_path: Path, noise: float) -> None:
    """One number a sample: the range score costs pure noise about 20 points, under the
    50-point rule; its relative RMS error says it is noise."""
    rng = np.random.default_rng(0)
    source = rng.normal(size=(200, 1))
    converted = source * (1 - noise) + noise * rng.normal(size=(200, 1))
    found = agreement([source], [converted], ["flag"])
    drop = agreement_drop(found)
    assert 1 < drop < 50
    attempt = Attempt("int8", "int8", accuracy_drop_points=drop, agreement=found.as_dict(),
                      verdict=Verdict.OVER_BUDGET, reason="over")
    report = ConversionReport("m.onnx", "onnx", "onnx", "int8", 1000, attempts=[attempt])
    hint = failure(report, ConvertConfig(model=tmp_path / "m.onnx", output=tmp_path / "m.efb",
                                         sign_key=tmp_path / "k")).hint or ""
    if noise == 1.0:
        assert "unusable" in hint and "'flag'" in hint and "relative RMS error" in hint
        assert "--max-drop" not in hint
    else:
        assert "--max-drop" in hint and "unusable" not in hint


def test_the_refusal_says_which_of_accuracy_and_agreement_set_the_points(
        heads: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    with np.load(heads["cal"]) as archive:
        np.savez(tmp_path / "narrow.npz", a=archive["a"] / 1000, b=archive["b"])
    with pytest.raises(NoResultError) as caught:
        convert(_config(heads["model"], tmp_path / "u.efb", signing_keys, quantize="int8",
                        calibration=tmp_path / "narrow.npz", eval=heads["eval"]))
    reason = caught.value.report.attempts[0].reason
    assert "the worst of accuracy and output agreement: here output 'scores' agreement" \
        in reason


# --- 14b D. --input-size counts channels and a fixed batch -----------------------------------

def _dynamic_image(path: Path, batch: int | str) -> Path:
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["y"])], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("batch", "size"), [("N", (4000, 4000)), (4, (2048, 2048))])
def test_input_size_counts_channels_and_a_fixed_batch(signing_keys: Keys, tmp_path: Path,
                                                      batch: int | str,
                                                      size: tuple[int, int]) -> None:
    """4000x4000 is within a side's bound, but with 3 channels 48 M numbers; 2048x2048 of 3
    channels is taken alone, not in a fixed batch of 4."""
    model = _dynamic_image(tmp_path / "pool.onnx", batch)
    with pytest.raises(DataError, match=r"--input-size: input 'x' would be .* numbers a call "
                       r".*above the 16,777,216 taken") as caught:
        convert(_config(model, tmp_path / "p.efb", signing_keys, input_size=size))
    assert "at most 4096 a side" in (caught.value.hint or "")


def test_input_size_above_4096_a_side_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a side above 4096"):
        ConvertConfig(model=tmp_path / "m.onnx", output=tmp_path / "m.efb",
                      sign_key=tmp_path / "k", input_size=(5000, 100))


# --- 14b E. a fixed batch of 3 with fewer samples is refused up front --------------------------

@pytest.mark.parametrize("which", ["calibration", "eval"])
def test_fewer_samples_than_a_fixed_batch_are_refused(signing_keys: Keys, tmp_path: Path,
                                                      which: str) -> None:
    """ONNX Runtime failed timing the source (one call of 2 rows to a batch of 3)."""
    source = _fixed_batch(tmp_path / "three.onnx", 3)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "few.npy", rng.random((2, WIDTH)).astype(np.float32))
    np.save(tmp_path / "many.npy", rng.random((9, WIDTH)).astype(np.float32))
    kw = {"calibration": tmp_path / "few.npy"} if which == "calibration" else \
        {"calibration": tmp_path / "many.npy", "eval": tmp_path / "few.npy"}
    with pytest.raises(DataError, match=r"few\.npy has 2 samples: the model needs at least 3 "
                       r"samples \(the batch is fixed at 3\)") as caught:
        convert(_config(source, tmp_path / "t.efb", signing_keys, quantize="int8", **kw))
    assert caught.value.hint


# --- 14b F. the drop shows enough digits to read above the budget ------------------------------

@pytest.mark.parametrize(("drop", "budget", "text"),
                         [(1.0004, 1.0, "1.0004"), (1.004, 1.0, "1.004"), (2.5, 1.0, "2.50"),
                          (69.3812, 1.0, "69.38")])
def test_a_drop_just_over_the_budget_reads_over_it(drop: float, budget: float,
                                                   text: str) -> None:
    assert points_above(drop, budget) == text
