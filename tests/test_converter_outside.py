"""What an outside tester found on models nobody here had tried, each pinned on a small
trained model or a published one (mediapipe's, from its PyPI wheel)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.evaluate import (
    CLASS,
    REGRESSION,
    agreement,
    output_error,
    output_kinds,
)
from edgefleet.converter.pipeline import convert, health_budget
from tests import wheel_models
from tests.conftest import Keys
from tests.models import TrainedModels


def _config(model: Path, out: Path, keys: Keys, **kw: object) -> ConvertConfig:
    return ConvertConfig(model=model, output=out, sign_key=keys.secret, **kw)  # type: ignore[arg-type]


def mediapipe_model(member: str) -> Path:
    """A model of the mediapipe wheel (``modules/...``), extracted once into the cache."""
    out = wheel_models.CACHE / "models" / Path(member).name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel_models.wheel(wheel_models.MEDIAPIPE)) as archive:
            out.write_bytes(archive.read(f"mediapipe/modules/{member}"))
    return out


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return wheel_models.domain_images("people", tmp_path_factory.mktemp("people"), count=4)


@pytest.fixture(scope="module")
def digits_npz(digits_models: TrainedModels,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("outside-data")
    d = digits_models.digits
    np.savez(out / "calib.npz", x=d.x_train[:100])
    np.savez(out / "eval.npz", x=d.x_test[:200], labels=d.y_test[:200])
    return {"calibration": out / "calib.npz", "eval": out / "eval.npz"}


# --- (j) every result is loaded by the device runtime; sparse weights ------------------------

def test_sparse_weights_are_made_dense_so_int8_of_a_sparse_model_loads_in_litert(
        people: tuple[Path, Path]) -> None:
    """mediapipe's full-range face detector keeps sparse float16 weights behind DENSIFY:
    the quantizer took the dense weights for activations (zero point -128) and LiteRT's
    int8 convolutions refused the result at load."""
    from edgefleet.converter import litert_quantizer
    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.sources import load_source

    path = mediapipe_model("face_detection/face_detection_full_range_sparse.tflite")
    raw = path.read_bytes()
    prepared = litert_quantizer.prepare(raw)
    ops = load_runtime_ops(prepared)
    assert "DENSIFY" in load_runtime_ops(raw) and "DENSIFY" not in ops
    source = load_source(path)
    data = load_dataset(people[0], source.inputs, "-1-1").take(2)
    sample = {k: v[:1] for k, v in data.inputs.items()}
    dense = load_runtime(prepared, "tflite")
    assert np.allclose(next(iter(dense.run(sample).values())), source.predict(sample)[0],
                       atol=1e-4), "the dense model computes what the sparse one does"
    quantized = litert_quantizer.quantize_tflite(raw, "int8", data)
    runtime = load_runtime(quantized, "tflite")  # raised: zero_point -128 != 0
    assert all(np.isfinite(v).all() for v in runtime.run(sample).values())


def load_runtime_ops(model: bytes) -> set[str]:
    """The operators the graph runs (not every code in its table)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    root = schema.Model.GetRootAsModel(model, 0)
    graph, codes = root.Subgraphs(0), [root.OperatorCodes(i) for i in
                                       range(root.OperatorCodesLength())]
    return {names[max(codes[graph.Operators(i).OpcodeIndex()].BuiltinCode(),
                      codes[graph.Operators(i).OpcodeIndex()].DeprecatedBuiltinCode())]
            for i in range(graph.OperatorsLength())}


# --- (a) classifier or regression ---------------------------------------------------------------

def test_a_landmark_model_is_judged_by_its_error_not_by_top1(
        tmp_path: Path, signing_keys: Keys, people: tuple[Path, Path]) -> None:
    """mediapipe's iris landmarks ([1, 213] and [1, 15] real values): top-1 of a landmark
    vector refused dynamic range at 4.17 points while its cosine was 0.9999."""
    report = convert(_config(mediapipe_model("iris_landmark/iris_landmark.tflite"),
                             tmp_path / "iris.efb", signing_keys, quantize="dynamic",
                             eval=people[1], scale="-1-1"))
    chosen = report.chosen_attempt
    assert chosen is not None and chosen.agreement["top1"] is None
    assert {k["kind"] for k in report.output_kinds} == {REGRESSION}
    assert all("not probability vectors" in k["rule"] for k in report.output_kinds)
    assert chosen.accuracy_drop_points is not None and chosen.accuracy_drop_points <= 1.0


def test_output_kinds_follow_labels_probabilities_and_the_override() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    boxes = rng.normal(size=(16, 4, 4))
    kinds = output_kinds([probs, logits, boxes], ("probs", "logits", "boxes"))
    assert [k.kind for k in kinds] == [CLASS, REGRESSION, REGRESSION]
    assert "probability vector" in kinds[0].rule and "no labels" in kinds[1].rule
    labelled = output_kinds([logits], ("logits",), labels=True)
    assert labelled[0].kind == CLASS and "labels were given" in labelled[0].rule
    forced = output_kinds([probs], ("probs",), overrides={"probs": REGRESSION})
    assert forced[0].kind == REGRESSION and "--output-kind" in forced[0].rule
    shuffled = probs[:, ::-1]
    assert agreement([probs], [shuffled], ("probs",)).top1 is not None
    assert agreement([probs], [shuffled], ("probs",), forced).top1 is None


def test_an_output_kind_for_an_output_the_model_lacks_is_refused_by_name(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.converter.errors import DataError

    with pytest.raises(DataError, match=r"--output-kind names \['nope'\]"):
        convert(_config(digits_models.tflite, tmp_path / "x.efb", signing_keys,
                        output_kinds=(("nope", "class"),)))


# --- (b) an int8 source is compared in the real domain ---------------------------------------

def test_an_int8_tflite_source_runs_on_real_values_quantized_with_its_own_scale(
        digits_models: TrainedModels, digits_npz: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.sources import load_source
    from edgefleet.converter.tflite_backend import to_tflite

    keras = load_source(digits_models.keras)
    calibration = load_dataset(digits_npz["calibration"], keras.inputs)
    source = tmp_path / "digits-int8-io.tflite"
    source.write_bytes(to_tflite(keras, "int8", calibration, int8_io=True))
    assert load_runtime(source.read_bytes(), "tflite").inputs[0].dtype == "int8"
    report = convert(_config(source, tmp_path / "same.efb", signing_keys,
                             eval=digits_npz["eval"]))
    assert report.source_accuracy is not None and report.source_accuracy >= 0.9, \
        "float data cast to int8 (zeros) gave chance accuracy"
    chosen = report.chosen_attempt
    assert chosen is not None and chosen.accuracy == report.source_accuracy
    assert chosen.agreement["worst_score"] == 1.0


# --- (l) float I/O unless --int8-io ----------------------------------------------------------

@pytest.mark.parametrize("int8_io", [False, True])
def test_int8_of_a_float_tflite_keeps_float_io_unless_int8_io(
        digits_models: TrainedModels, digits_npz: dict[str, Path], signing_keys: Keys,
        tmp_path: Path, int8_io: bool) -> None:
    out = tmp_path / "q.efb"
    convert(_config(digits_models.tflite, out, signing_keys, quantize="int8",
                    calibration=digits_npz["calibration"], eval=digits_npz["eval"],
                    int8_io=int8_io))
    manifest = read_bundle(out, signing_keys.trusted).manifest
    wanted = "int8" if int8_io else "float32"
    assert [t.dtype for t in [*manifest.inputs, *manifest.outputs]] == [wanted, wanted]


# --- (m) health data is bounded --------------------------------------------------------------

def test_health_data_is_bounded_for_a_tiny_model_with_large_inputs(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    """A model of a few KB on 64 x 64 colour images: eight health rows were 400 KB."""
    import keras

    keras.utils.set_random_seed(0)
    d = digits_models.digits
    x = np.repeat(np.repeat(np.repeat(d.x_train[:256], 8, 1), 8, 2), 3, 3)
    model = keras.Sequential([keras.Input((64, 64, 3), name="image"),
                              keras.layers.Conv2D(4, 8, strides=8, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, d.y_train[:256], epochs=1, verbose=0)
    path = tmp_path / "tiny.keras"
    model.save(path)
    np.savez(tmp_path / "eval.npz", image=x[:32], labels=d.y_train[:32])
    out = tmp_path / "tiny.efb"
    report = convert(_config(path, out, signing_keys, eval=tmp_path / "eval.npz"))
    files = read_bundle(out, signing_keys.trusted).files
    model_bytes = len(files["model.tflite"])
    assert model_bytes < 10_000
    assert len(files["health.npz"]) <= health_budget(model_bytes) + 4096
    assert report.bundle_bytes is not None and report.bundle_bytes < 100_000


def test_a_digits_bundle_stays_small(digits_models: TrainedModels, digits_npz: dict[str, Path],
                                     signing_keys: Keys, tmp_path: Path) -> None:
    report = convert(_config(digits_models.keras, tmp_path / "d.efb", signing_keys,
                             quantize="int8", calibration=digits_npz["calibration"],
                             eval=digits_npz["eval"]))
    assert report.bundle_bytes is not None and report.bundle_bytes < 64_000


# --- (c) metric extremes ---------------------------------------------------------------------

def test_a_constant_offset_under_a_large_mean_counts() -> None:
    rng = np.random.default_rng(0)
    source = 100 + rng.normal(size=(16, 32))
    shifted = output_error(0, "coords", source, source + 1.0)
    assert shifted.cosine > 0.9999, "the plain cosine hides it"
    assert shifted.judged_by == "centered cosine" and shifted.score < 0.9
    close = output_error(0, "coords", source, source + rng.normal(scale=0.01, size=source.shape))
    assert close.score > 0.999


def test_a_near_constant_probability_is_judged_against_a_floor_of_its_magnitude() -> None:
    source = np.full((16, 1), 0.999) + np.linspace(0, 0.0005, 16)[:, None]
    found = output_error(0, "presence", source, source - 0.002)
    assert found.range < 0.001 and found.judged_range == pytest.approx(0.09995, rel=1e-3)
    assert found.score > 0.99, "0.2 % off a confident probability is no failure"
    wrong = output_error(0, "presence", source, source - 0.2)
    assert wrong.score < 0.99
