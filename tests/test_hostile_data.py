"""Hostile calibration and evaluation data: every ``.npy`` / ``.npz`` a header can describe is
read as a bounded Dataset or refused as a DataError, in bounded memory and time.

The class: ``.npy`` headers of any version, dtype (objects included), order and shape (up to
2^40 rows) over bodies that are honest, cut short or missing; random bytes; ``.npz`` archives
whose members are such arrays, pickles, non-``.npy`` files, or unused members declaring
gigabytes; plus files that are not regular (a FIFO) and image folders mixing labelled and
unlabelled images.
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.runtime.base import TensorInfo
from edgefleet.converter.data import MAX_DATA_BYTES, Dataset, load_dataset
from edgefleet.converter.errors import DataError
from tests.hostile import HOSTILE, MiB, peak_traced_bytes

SPEC = [TensorInfo("x", (-1, 4), "float32")]
IN_PROCESS_CAP = 24 * MiB  # a generated file is at most a few KB of real data
EXAMPLE_SECONDS = 5.0

DTYPES = ["<f4", "<f8", "<i8", "|u1", "<f2", "|b1", "|O", "<c8", "<U3", "|V8", ">f4"]


def _header(shape: tuple[int, ...], descr: str, fortran: bool, version: int) -> bytes:
    out = io.BytesIO()
    info = {"descr": descr, "fortran_order": fortran, "shape": shape}
    if version == 1:
        np.lib.format.write_array_header_1_0(out, info)
    else:
        np.lib.format.write_array_header_2_0(out, info)
    return out.getvalue()


@st.composite
def npy_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["header", "header", "header", "random", "valid"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "valid":
        rows = draw(st.integers(0, 40))
        out = io.BytesIO()
        np.save(out, np.ones((rows, 4), np.float32))
        return out.getvalue()
    shape = tuple(draw(st.lists(st.one_of(st.integers(0, 8), st.integers(0, 1 << 40)),
                                max_size=4)))
    head = _header(shape, draw(st.sampled_from(DTYPES)), draw(st.booleans()),
                   draw(st.sampled_from([1, 2])))
    body = draw(st.binary(max_size=2048))
    cut = draw(st.integers(0, len(head)))
    return head[:cut] if draw(st.booleans()) and cut < len(head) else head + body


@st.composite
def npz_bytes(draw: st.DrawFn) -> bytes:
    out = io.BytesIO()
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name in draw(st.lists(st.sampled_from(["x.npy", "labels.npy", "junk.npy", "x",
                                                   "y.npy", "x.txt"]),
                                  max_size=4, unique=True)):
            archive.writestr(name, draw(npy_bytes()))
    data = out.getvalue()
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return data


def _load_bounded(path: Path) -> Dataset | BaseException:
    started = time.monotonic()
    result, peak = peak_traced_bytes(lambda: load_dataset(path, SPEC, limit=200))
    assert time.monotonic() - started < EXAMPLE_SECONDS
    assert peak < IN_PROCESS_CAP, f"{peak} bytes traced reading {path.name}"
    if isinstance(result, BaseException):
        assert isinstance(result, DataError), repr(result)  # never a traceback's exception
        assert result.message and result.hint
    else:
        assert isinstance(result, Dataset)
        assert result.inputs["x"].dtype == np.float32 and 1 <= len(result) <= 200
    return result


@HOSTILE
@given(npy_bytes())
def test_any_npy_is_read_bounded_or_refused_by_name(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "data.npy"
    path.write_bytes(data)
    _load_bounded(path)


@HOSTILE
@given(npz_bytes())
def test_any_npz_is_read_bounded_or_refused_by_name(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(data)
    _load_bounded(path)


def test_an_unused_npz_member_of_gigabytes_is_never_read(tmp_path: Path) -> None:
    """A 3 GiB member no input takes (stored as zeros, compressed to a few MB) costs
    nothing: only the members an input or 'labels' needs are read."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.ones((120, 4), np.float32))
        archive.writestr("x.npy", buffer.getvalue())
        with archive.open("junk.npy", "w", force_zip64=True) as junk:
            junk.write(_header((3 << 30,), "|u1", False, 1))
            zeros = bytes(64 * MiB)
            for _ in range(48):
                junk.write(zeros)
    assert path.stat().st_size < 16 * MiB
    result = _load_bounded(path)
    assert isinstance(result, Dataset) and len(result) == 120


def test_a_sparse_npy_declaring_gigabytes_reads_only_the_samples_it_keeps(
        tmp_path: Path) -> None:
    path = tmp_path / "sparse.npy"
    with path.open("wb") as out:
        out.write(_header((100_000_000, 4), "<f4", False, 1))
        out.truncate(out.tell() + 100_000_000 * 16)  # 1.6 GB, a hole on disk
    result = _load_bounded(path)
    assert isinstance(result, Dataset) and len(result) == 200
    with pytest.raises(DataError, match=r"holds 100000000 samples .* above the 1 GiB") as caught:
        load_dataset(path, SPEC)  # all of it (an evaluation set): refused before reading
    assert f"at most {MAX_DATA_BYTES // 16} samples" in (caught.value.hint or "")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_pickle_is_refused_as_python_objects(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    array = np.array([object()] * 4, dtype=object).reshape(1, 4)
    if suffix == ".npy":
        np.save(path, array, allow_pickle=True)
    else:
        np.savez(path, x=array)
    with pytest.raises(DataError, match="holds Python objects"):
        load_dataset(path, SPEC)


def test_an_empty_file_is_refused_not_aborted(tmp_path: Path) -> None:
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(DataError, match="not a readable .npy file, or it is cut short"):
        load_dataset(tmp_path / "empty.npy", SPEC)


def test_no_samples_say_so_whatever_the_batch(tmp_path: Path) -> None:
    np.save(tmp_path / "zero.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match=r"holds no samples \(shape \[0, 4\]\)"):
        load_dataset(tmp_path / "zero.npy", SPEC)


def test_a_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "data.npy")  # opening it would block for ever
    with pytest.raises(DataError, match="not a regular file"):
        load_dataset(tmp_path / "data.npy", SPEC)
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "a.png")
    os.mkfifo(folder / "b.png")
    with pytest.raises(DataError, match=r"b\.png is not a regular file"):
        load_dataset(folder, [TensorInfo("image", (-1, 8, 8, 3), "float32")])


def test_images_both_loose_and_in_class_folders_are_refused(tmp_path: Path) -> None:
    for name in ("root.png", "cat/a.png", "dog/b.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _png(tmp_path / name)
    with pytest.raises(DataError, match="1 images at its top level and 2 in class") as caught:
        load_dataset(tmp_path, [TensorInfo("image", (-1, 8, 8, 3), "float32")])
    assert "class sub-folder" in (caught.value.hint or "")


def test_an_image_folder_beyond_the_data_bound_is_refused_before_reading(
        tmp_path: Path) -> None:
    for index in range(3):
        (tmp_path / f"{index}.png").write_bytes(b"not read")  # refused before any is opened
    spec = [TensorInfo("image", (-1, 12000, 12000, 3), "float32")]
    with pytest.raises(DataError, match=r"3 images at 12000x12000x3 take 4\.8 GiB") as caught:
        load_dataset(tmp_path, spec)
    assert caught.value.hint == "a smaller --input-size: one alone takes 1.6 GiB"
    spec = [TensorInfo("image", (-1, 6000, 6000, 3), "float32")]  # 412 MiB an image
    with pytest.raises(DataError, match=r"give at most 2 images, or a smaller --input-size"):
        load_dataset(tmp_path, spec)
    assert len(load_dataset.__defaults__ or ()) == 2  # scale and limit stay optional


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)


# --- memory at the input-size bound (outside test 14c, F6) ---------------------------------


def test_calls_of_large_samples_hold_one_and_few_samples_are_not_padded() -> None:
    from edgefleet.converter.evaluate import BATCH, CALL_BYTES, batch_size

    dynamic = [TensorInfo("x", (-1, 1, -1, -1), "float32")]
    big = Dataset({"x": np.zeros((3, 1, 2048, 2048), np.float32)})  # 16 MiB a sample
    assert batch_size(dynamic, big) == max(1, CALL_BYTES // (2048 * 2048 * 4)) < 3
    few = Dataset({"x": np.zeros((4, 1, 8, 8), np.float32)})
    assert batch_size(dynamic, few) == 4  # was 64: sixteen times the work and memory
    assert batch_size(dynamic) == BATCH
    assert batch_size([TensorInfo("x", (3, 1, 8, 8), "float32")], few) == 3  # fixed: kept


def test_random_inputs_are_float32_and_bounded_at_large_sizes() -> None:
    from types import SimpleNamespace
    from typing import cast

    from edgefleet.converter.pipeline import SYNTHETIC_BYTES, SYNTHETIC_ROWS, _synthetic
    from edgefleet.converter.sources import SourceModel

    large = cast(SourceModel, SimpleNamespace(inputs=[TensorInfo("x", (-1, 1, 2048, 2048),
                                                                  "float32")]))
    data, peak = peak_traced_bytes(lambda: _synthetic(large))
    assert isinstance(data, Dataset) and data.inputs["x"].dtype == np.float32
    assert len(data) == SYNTHETIC_BYTES // (2048 * 2048 * 4)
    assert peak <= SYNTHETIC_BYTES * 1.1  # drawn as float32: no float64 copy twice the size
    small = cast(SourceModel, SimpleNamespace(inputs=[TensorInfo("x", (-1, 4), "float32")]))
    assert len(_synthetic(small)) == SYNTHETIC_ROWS


def test_a_source_running_out_of_memory_is_said_so_not_blamed_on_the_data() -> None:
    from types import SimpleNamespace
    from typing import cast

    from edgefleet.converter.failures import out_of_memory
    from edgefleet.converter.pipeline import _source_outputs
    from edgefleet.converter.sources import SourceModel

    def predict(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise MemoryError("Unable to allocate 4.00 GiB for an array")

    source = cast(SourceModel, SimpleNamespace(inputs=SPEC, predict=predict))
    data = Dataset({"x": np.zeros((2, 4), np.float32)})
    with pytest.raises(DataError, match=r"runs out of memory on inputs of x \[4\]") as caught:
        _source_outputs(source, data, lambda *a, **k: None)
    assert caught.value.hint == "give a smaller --input-size / --input-shape"
    assert out_of_memory(RuntimeError("bfc_arena.cc:360 BFCArena::AllocateRawInternal "
                                      "Failed to allocate memory for requested buffer"))
    assert not out_of_memory(RuntimeError("Invalid rank for input: x"))


def test_an_image_of_more_pixels_than_edgefleet_decodes_is_refused_from_its_header(
        tmp_path: Path) -> None:
    """60 M pixels, below PIL's own refusal (179 M) and its warning (89 M), in a few KB of
    PNG: refused before decoding (decoded as RGBA it took 2.5 GB at 121 M pixels)."""
    from PIL import Image

    from edgefleet.converter.data import MAX_IMAGE_PIXELS

    Image.new("1", (8000, 7500)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 1 * MiB
    spec = [TensorInfo("image", (-1, 8, 8, 3), "float32")]
    result, peak = peak_traced_bytes(lambda: load_dataset(tmp_path, spec))
    assert isinstance(result, DataError), repr(result)
    assert "60,000,000 pixels (8000x7500), above the 50,000,000" in result.message
    assert "resize it" in (result.hint or "") and MAX_IMAGE_PIXELS < 8000 * 7500
    assert peak < IN_PROCESS_CAP


def test_a_small_output_around_an_offset_is_judged_on_its_own_spread() -> None:
    """4 numbers of 1000 +- 3 whose error (about 2) is as large as their variation: refused
    as noise; a probability near 1.0 keeps its floor of a tenth."""
    from edgefleet.converter.evaluate import output_error

    rng = np.random.default_rng(0)
    source = 1000.0 + rng.uniform(-3, 3, (16, 4))
    noisy = source + rng.uniform(-2, 2, (16, 4))
    found = output_error(0, "altitude", source, noisy)
    assert found.judged_by == "range" and found.judged_range == pytest.approx(
        float(source.max() - source.min()), rel=1e-6)
    assert found.score < 0.95  # it scored 0.996 against a range of 100
    confident = np.full((16, 2), 0.9995) + rng.uniform(0, 0.0005, (16, 2))
    assert output_error(0, "p", confident, confident - 0.002).score > 0.99


def test_data_beyond_what_the_lineage_hashes_is_refused_before_reading(tmp_path: Path) -> None:
    """A sparse file declaring 60 GiB took 77 s to hash for the lineage after 200 rows were
    read; files in an image folder that are not images are neither read nor hashed."""
    from edgefleet.converter.data import MAX_HASHED_BYTES
    from edgefleet.converter.lineage import data_ref

    path = tmp_path / "sparse.npy"
    with path.open("wb") as out:
        out.write(_header((MAX_HASHED_BYTES // 16 + 1, 4), "<f4", False, 1))
        out.truncate(out.tell() + MAX_HASHED_BYTES + 16)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"holds 8\.0 GiB: a bundle's lineage hashes"):
        load_dataset(path, SPEC, limit=200)
    assert time.monotonic() - started < EXAMPLE_SECONDS
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "a.png")
    with (folder / "notes.bin").open("wb") as out:
        out.truncate(MAX_HASHED_BYTES + 1)  # not an image: neither read nor hashed
    load_dataset(folder, [TensorInfo("image", (-1, 8, 8, 3), "float32")])
    started = time.monotonic()
    ref = data_ref(folder)
    assert ref is not None and ref.files == 1 and time.monotonic() - started < EXAMPLE_SECONDS


def test_a_file_that_is_not_a_zip_is_not_called_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"hello world")
    with pytest.raises(DataError, match=r"bad\.npz is not a readable \.npz file"):
        load_dataset(tmp_path / "bad.npz", SPEC)
    import pickle

    (tmp_path / "obj.npy").write_bytes(pickle.dumps({"x": [1, 2]}))
    with pytest.raises(DataError, match=r"obj\.npy holds Python objects"):
        load_dataset(tmp_path / "obj.npy", SPEC)


def test_a_small_output_turned_to_noise_is_unusable_not_offered_a_max_drop() -> None:
    """Its range score costs a few points only (a --max-drop 7.2 was offered and wrote it,
    exit 0); its error is as large as its variation: noise (outside test 14c, F33)."""
    from edgefleet.converter.advice import _unusable_why
    from edgefleet.converter.evaluate import output_error
    from edgefleet.converter.report import Attempt

    rng = np.random.default_rng(1)
    source = 1000.0 + rng.uniform(-3, 3, (16, 4))
    found = output_error(0, "altitude", source, source + rng.uniform(-2, 2, (16, 4)))
    assert found.centered_rel_rms > 0.5 and found.rel_rms < 0.01  # uncentered: hidden
    attempt = Attempt("int8", "int8", agreement={"outputs": [found.as_dict()]})
    assert "output 'altitude' has a relative RMS error of" in _unusable_why(attempt)
    close = output_error(0, "altitude", source, source + rng.uniform(-0.1, 0.1, (16, 4)))
    assert _unusable_why(Attempt("int8", "int8", agreement={"outputs": [close.as_dict()]})) \
        == ""


def test_a_slow_model_is_timed_in_bounded_time() -> None:
    """At the input-size bound a call takes seconds: 50 runs a measurement, 3 rounds of
    two, made a conversion run for over 12 minutes (outside test 14c, F32)."""
    from edgefleet.converter.evaluate import LATENCY_SECONDS, MIN_RUNS, latency_p50_ms

    calls: list[float] = []

    def slow(feeds: object) -> list[np.ndarray]:
        time.sleep(0.3)
        calls.append(time.monotonic())
        return []

    started = time.monotonic()
    assert latency_p50_ms(slow, {}) >= 300
    assert len(calls) <= MIN_RUNS + 1 + int(2 * LATENCY_SECONDS / 0.3) + 2
    assert time.monotonic() - started < 2 * LATENCY_SECONDS + 0.3 * (MIN_RUNS + 2)
    calls.clear()

    def fast(feeds: object) -> list[np.ndarray]:
        calls.append(time.monotonic())
        return []

    assert latency_p50_ms(fast, {}, runs=50) >= 0
    assert len(calls) == 55  # a fast model keeps its 5 warm-up and 50 timed calls


def test_random_inputs_give_an_image_input_a_real_size(tmp_path: Path) -> None:
    """Without data, a dynamic height and width were 1: two unpadded 3x3 convolutions failed
    on the source itself. They are 224, as for an image folder, and the warning says so."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.agent.protocol.signing import generate_keypair
    from edgefleet.converter.config import ConvertConfig
    from edgefleet.converter.pipeline import convert

    weights = np.full((2, 3, 3, 3), 0.1, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("Conv", ["c", "w2"], ["y"])],
        "twice", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "h2", "w2"])],
        [numpy_helper.from_array(weights, "w"),
         numpy_helper.from_array(np.full((2, 2, 3, 3), 0.1, np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "conv.onnx")
    key, _ = generate_keypair(tmp_path / "keys", "t")
    report = convert(ConvertConfig(model=tmp_path / "conv.onnx", output=tmp_path / "c.efb",
                                   sign_key=key, format="onnx", quantize="none"))
    assert (tmp_path / "c.efb").exists()
    [said] = [w for w in report.warnings if "uniform random inputs" in w]
    assert "'x': [" in said and ", 3, 224, 224]" in said and "--input-size" in said
