"""Per-output errors, the default budget, true hints, recipes, fixed shapes and the search."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.errors import DataError, NoResultError
from edgefleet.converter.evaluate import agreement, output_error
from edgefleet.converter.pipeline import convert
from edgefleet.converter.report import Attempt
from edgefleet.converter.search import Candidate, Search, auto_candidates
from tests.conftest import Keys
from tests.models import TrainedModels


def _config(model: Path, out: Path, keys: Keys, **kw: object) -> ConvertConfig:
    return ConvertConfig(model=model, output=out, sign_key=keys.secret, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def data(digits_models: TrainedModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("search-data")
    d = digits_models.digits
    np.savez(out / "calib.npz", x=d.x_train[:100])
    np.savez(out / "eval.npz", x=d.x_test[:200], labels=d.y_test[:200])
    np.savez(out / "bad.npz", x=d.x_train[:100] * 0.01)  # ranges 100x too small
    return {"calibration": out / "calib.npz", "eval": out / "eval.npz", "bad": out / "bad.npz"}


# --- errors per output ---------------------------------------------------------------------

def test_each_output_gets_cosine_rel_rms_and_sqnr_and_the_worst_is_named() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(32, 50))
    flag = rng.uniform(0, 10, size=(32, 1))  # one number a sample: judged by its range
    found = agreement([big, flag], [big + rng.normal(scale=0.01, size=big.shape), flag + 1.0],
                      names=("landmarks", "presence"))
    landmarks, presence = found.outputs
    assert landmarks.judged_by == "centered cosine" and landmarks.cosine > 0.999
    assert landmarks.rel_rms == pytest.approx(0.01, rel=0.1)
    assert landmarks.sqnr_db == pytest.approx(40.0, abs=1.0)
    assert presence.judged_by == "range"
    assert presence.max_abs_error == pytest.approx(1.0)
    assert presence.score == pytest.approx(1 - 0.2 * 1.0 / presence.range)
    assert found.worst.name == "presence", "a 10 % error of the range beats a 0.9999 cosine"
    assert "presence" in found.as_dict()["worst"] and "of its range" in found.as_dict()["worst"]


def test_an_exact_output_has_no_sqnr_number_and_scores_one() -> None:
    value = np.ones((4, 3))
    error = output_error(0, "same", value, value.copy())
    assert error.sqnr_db is None and error.score == 1.0 and error.rel_rms == 0.0


# --- default budget and hints ----------------------------------------------------------------

@pytest.mark.timeout(600)  # four conversions: the refusal and each hint's (~90 s on 2 cores)
def test_without_max_drop_a_broken_int8_is_refused_and_every_hint_works(
        digits_models: TrainedModels, data: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    out = tmp_path / "never.efb"
    base = _config(digits_models.keras, out, signing_keys, quantize="int8",
                   calibration=data["bad"], eval=data["eval"])
    with pytest.raises(NoResultError) as failed:
        convert(base)
    assert not out.exists()
    assert "exceeds the budget of 1.0 points (the default" in str(failed.value)
    suggestions = failed.value.report.suggestions
    options = [s["option"] for s in suggestions]
    # 93 points off (accuracy 0.97 -> 0.2): unusable, so no --max-drop that would accept it
    assert not any(o.startswith("--max-drop") for o in options) and "--quantize fp16" in options
    assert "unusable" in (failed.value.hint or "")
    assert all(s["option"] in (failed.value.hint or "") for s in suggestions)
    for suggestion in suggestions:  # each hint, as given, gives a written bundle
        target = tmp_path / f"{suggestion['option'].replace(' ', '_')}.efb"
        report = convert(dataclasses.replace(base, output=target, **suggestion["config"]))
        assert report.chosen is not None and target.exists(), suggestion


# --- float TFLite sources: every recipe, fp16 and auto ------------------------------------

@pytest.mark.parametrize("mode", ["fp16", "weight-only", "auto"])
def test_float_tflite_source_recipes(digits_models: TrainedModels, data: dict[str, Path],
                                     signing_keys: Keys, tmp_path: Path, mode: str) -> None:
    out = tmp_path / f"{mode}.efb"
    report = convert(_config(digits_models.tflite, out, signing_keys, quantize=mode,
                             calibration=data["calibration"], eval=data["eval"]))
    chosen = report.chosen_attempt
    assert chosen is not None and chosen.size_bytes is not None
    assert chosen.size_bytes < report.source_bytes * 0.6
    assert chosen.recipe, "the backend recipe is named"
    expected = {"fp16": "float16", "weight-only": "int8"}.get(mode, "int8")
    assert expected in chosen.dtypes
    assert read_bundle(out, signing_keys.trusted).manifest.optimization.quantization == \
        chosen.label


def test_keep_float_leaves_the_named_tflite_operator_in_float(
        digits_models: TrainedModels, data: dict[str, Path]) -> None:
    from ai_edge_litert import schema_py_generated as schema

    from edgefleet.converter import litert_quantizer, sensitivity
    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.sources import load_source

    raw = digits_models.tflite.read_bytes()
    calib = load_dataset(data["calibration"], load_source(digits_models.tflite).inputs).take(16)
    full = litert_quantizer.quantize_tflite(raw, "int8", calib)
    ranking = sensitivity.tflite_ranking(litert_quantizer.prepare(raw), full, calib)
    assert ranking, "the operators are ranked"
    conv = next(name for name in ranking if "conv" in name.lower())
    mixed = litert_quantizer.quantize_tflite(raw, "int8", calib, keep_float=(conv,))
    root = schema.Model.GetRootAsModel(mixed, 0)
    graph = root.Subgraphs(0)
    names = {bytes(graph.Tensors(i).Name()).decode(): graph.Tensors(i).Type()
             for i in range(graph.TensorsLength())}
    assert names[conv] == schema.TensorType.FLOAT32, "the kept operator's output is float"
    assert len(mixed) > len(full), "its float weights make the file larger"


# --- fixed input shapes ------------------------------------------------------------------

def _dynamic_onnx(path: Path, wide: int, narrow: int) -> Path:
    """A small CNN with dynamic height and width (as detectors have)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(size=shape) * 0.2).astype(np.float32), name)

    weights = [tensor("w1", wide, 3, 3, 3), tensor("w2", narrow, wide, 3, 3),
               tensor("h", narrow, 4)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "h"], ["y"], name="head")]
    graph = helper.make_graph(
        nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large enough that int8 is smaller than float (run at a small fixed size)."""
    return _dynamic_onnx(tmp_path_factory.mktemp("dyn") / "dyn.onnx", 64, 32)


@pytest.fixture(scope="module")
def tiny_dynamic_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cheap at 224x224: for the run without a size."""
    return _dynamic_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx", 4, 4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_input_size_fixes_dynamic_dims_and_calibrates_at_that_size(
        dynamic_onnx: Path, photos: Path, signing_keys: Keys, tmp_path: Path) -> None:
    out = tmp_path / "fixed.efb"
    report = convert(_config(dynamic_onnx, out, signing_keys, format="onnx", quantize="int8",
                             calibration=photos, input_size=(32, 48), max_drop=100.0))
    assert report.input_shapes == {"x": [-1, 3, 32, 48]}
    assert not any("dynamic height or width" in w for w in report.warnings)
    manifest = read_bundle(out, signing_keys.trusted).manifest
    assert list(manifest.inputs[0].shape)[1:] == [3, 32, 48], "the artifact's dims are static"
    assert manifest.metrics["input_shapes"] == {"x": [-1, 3, 32, 48]}


@pytest.fixture(scope="module")
def dynamic_keras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Keras image model with a dynamic height and width (untrained: shapes are tested)."""
    import keras

    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path_factory.mktemp("dynamic-keras") / "dynamic.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.mark.parametrize("quantize", ["none", "dynamic"])
def test_input_size_fixes_a_keras_models_dynamic_dims_in_the_tflite_artifact(
        dynamic_keras: Path, photos: Path, signing_keys: Keys, tmp_path: Path,
        quantize: str) -> None:
    out = tmp_path / "fixed.efb"
    report = convert(_config(dynamic_keras, out, signing_keys, format="tflite",
                             quantize=quantize, calibration=photos, input_size=(32, 48),
                             max_drop=100.0))
    assert report.input_shapes == {"image": [-1, 32, 48, 3]}
    manifest = read_bundle(out, signing_keys.trusted).manifest
    assert list(manifest.inputs[0].shape)[1:] == [32, 48, 3], "the TFLite input carries them"
    chosen = report.chosen_attempt
    assert chosen is not None
    assert chosen.agreement["worst_score"] > 0.99, chosen.agreement


def test_a_keras_models_dynamic_dims_left_dynamic_for_tflite_are_refused_with_the_options(
        dynamic_keras: Path, photos: Path, signing_keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dynamic dims \[-1, -1, -1, 3\]") as refused:
        convert(_config(dynamic_keras, tmp_path / "d.efb", signing_keys, format="tflite",
                        quantize="dynamic", calibration=photos))
    assert "--input-size" in refused.value.hint and "--format onnx" in refused.value.hint


def test_a_dynamic_model_fed_images_without_a_size_is_warned_with_the_size_used(
        tiny_dynamic_onnx: Path, photos: Path, signing_keys: Keys, tmp_path: Path) -> None:
    report = convert(_config(tiny_dynamic_onnx, tmp_path / "d.efb", signing_keys, format="onnx",
                             calibration=photos))
    assert any("resized to 224x224" in w and "--input-size" in w for w in report.warnings)


def test_input_shape_for_a_missing_input_or_a_fixed_dim_is_refused_by_name(
        dynamic_onnx: Path, signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.converter.errors import DataError

    with pytest.raises(DataError, match=r"names \['image'\], the model's inputs are \['x'\]"):
        convert(_config(dynamic_onnx, tmp_path / "x.efb", signing_keys, format="onnx",
                        input_shapes=(("image", (1, 3, 8, 8)),)))
    with pytest.raises(DataError, match="differs at dim 1"):
        convert(_config(dynamic_onnx, tmp_path / "x.efb", signing_keys, format="onnx",
                        input_shapes=(("x", (1, 4, 8, 8)),)))


# --- the search (pure: the ladder and its stops) ----------------------------------------------

def _walk(search: Search, accept: set[str]) -> list[str]:
    labels = []
    for candidate in auto_candidates(search):
        labels.append(candidate.label)
        attempt = Attempt(candidate.label, candidate.mode, list(candidate.keep_float),
                          size_bytes=100, accepted=candidate.label in accept)
        attempt.agreement = {"worst_score": 0.5 if candidate.method == "percentile" else 0.1}
        search.attempts.append(attempt)
    return labels


def test_auto_tries_recipes_smallest_first_and_keeps_fewest_ops_float() -> None:
    ranked = [f"op{i}" for i in range(40)]
    onnx = Search("onnx", "onnx", [], lambda base: ranked)
    assert _walk(onnx, {"int8-percentile-mixed-4"}) == [
        "int8", "int8-percentile", "int8-entropy", "int8-percentile-mixed-1",
        "int8-percentile-mixed-2", "int8-percentile-mixed-4"], "mixed starts from the closest"
    tflite = Search("tflite", "tflite", [], lambda base: ranked)
    assert _walk(tflite, set()) == ["int8", "weight-only", "dynamic", "int8-mixed-1",
                                    "int8-mixed-2", "int8-mixed-4", "int8-mixed-8",
                                    "int8-mixed-16", "fp16", "float"], \
        "at most half the ops kept float; float32 when nothing smaller held"
    assert _walk(Search("keras", "tflite", [], lambda base: ranked), {"int8"}) == \
        ["int8", "dynamic"], "the tier of similar sizes is tried whole: the smallest wins"
    assert _walk(Search("onnx", "onnx", [], lambda base: ranked), {"int8"}) == ["int8"]


def test_auto_stops_when_the_search_budget_is_spent_and_still_tries_fp16() -> None:
    search = Search("onnx", "onnx", [], lambda base: ["a", "b"], seconds=1e-9)
    assert _walk(search, set()) == ["fp16", "float"]
    assert "search budget" in search.stopped and "--search-budget" in search.stopped


def test_auto_returns_the_float_model_only_when_fp16_missed_too() -> None:
    search = Search("onnx", "onnx", [], lambda base: [], seconds=1e-9)
    assert _walk(search, {"fp16"}) == ["fp16"] and search.notes == []
    search = Search("onnx", "onnx", [], lambda base: [], seconds=1e-9)
    assert _walk(search, {"float"}) == ["fp16", "float"]
    assert search.attempts[-1].mode == "none" and "stays float32" in search.notes[0]


def test_a_candidate_names_its_recipe() -> None:
    assert Candidate("int8", "int8").method == "minmax"
    assert Candidate("int8", "int8").activations == "uint8"


def test_progress_names_each_candidate_and_counts_only_counted_stages(
        digits_models: TrainedModels, data: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    seen: list[tuple[str, int | None, int | None]] = []
    convert(_config(digits_models.tflite, tmp_path / "p.efb", signing_keys,
                    quantize="weight-only", eval=data["eval"]),
            lambda text, done=None, total=None: seen.append((text, done, total)))
    texts = [t for t, _, _ in seen]
    assert "loading the source model" in texts and "writing the signed bundle" in texts
    assert any(t.startswith("[1] converting: weight-only") for t in texts)
    counted = [(d, n) for t, d, n in seen if t.startswith("[1] evaluating")]
    assert counted and counted[-1] == (200, 200), "evaluation counts its samples"
    assert all((d is None) == (n is None) for _, d, n in seen), "no count without a total"
