"""The second outside look at the converter's fixes (14d): a header of negative dims, inputs
and outputs of types numpy cannot hold, external data without a length, and -o over a
file the conversion reads that the first fix did not list."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.protocol.signing import generate_keypair
from edgefleet.agent.runtime.base import TensorInfo
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.data import load_dataset
from edgefleet.converter.errors import DataError, SourceModelError
from edgefleet.converter.pipeline import convert
from edgefleet.converter.sources import load_source
from tests.hostile import MiB, peak_traced_bytes

SPEC = [TensorInfo("x", (-1, 4), "float32")]


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return out.getvalue()


def test_a_header_of_negative_dims_is_refused_before_any_read(tmp_path: Path) -> None:
    """A read of a negative size reads the whole stream: a 3 MB .npz inflated 3 GiB."""
    sparse = tmp_path / "neg.npy"
    with sparse.open("wb") as out:
        out.write(_npy_header((1, -1), "|u1"))
        out.truncate(out.tell() + (64 << 20))
    bomb = tmp_path / "neg.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("x.npy", "w", force_zip64=True) as member:
        member.write(_npy_header((1, -1)))
        for _ in range(4):
            member.write(bytes(16 << 20))
    for path in (sparse, bomb):
        def read(p: Path = path) -> object:
            return load_dataset(p, SPEC, limit=200)

        result, peak = peak_traced_bytes(read)
        assert isinstance(result, DataError), repr(result)
        assert "declares shape [1, -1]: dims are 0 or more" in result.message
        assert peak < 8 * MiB


def _model(path: Path, in_type: int = TensorProto.FLOAT, extra_out: int | None = None,
           external: bool = False) -> Path:
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["xf", "w"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])]
    if extra_out is not None:
        nodes.append(helper.make_node("Cast", ["y"], ["o"], to=extra_out))
        outputs.append(helper.make_tensor_value_info("o", extra_out, ["n", 4]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", in_type,
                                                                          ["n", 16])],
                              outputs, [numpy_helper.from_array(
                                  np.ones((16, 4), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    if external:
        onnx.save(model, path, save_as_external_data=True, location=f"{path.name}.data",
                  size_threshold=0)
    else:
        onnx.save(model, path)
    return path


@pytest.mark.parametrize(("in_type", "out_type", "says"), [
    (TensorProto.STRING, None, "input 'x' is tensor(string)"),
    (TensorProto.BFLOAT16, None, "input 'x' is tensor(bfloat16)"),
    (TensorProto.FLOAT, TensorProto.BFLOAT16, "output 'o' is tensor(bfloat16)"),
    (TensorProto.FLOAT, TensorProto.INT4, "output 'o' is tensor(int4)"),
])
def test_types_numpy_cannot_hold_are_refused_up_front_naming_them(
        tmp_path: Path, in_type: int, out_type: int | None, says: str) -> None:
    """Were fed float32 random data and blamed on the data's values ('integer ids within
    its vocabulary'), or failed as 'No corresponding Numpy type'."""
    path = _model(tmp_path / "m.onnx", in_type, out_type)
    with pytest.raises(SourceModelError, match=re.escape(says)):
        load_source(path)


def test_external_data_without_a_length_is_bounded_by_what_it_declares(
        tmp_path: Path) -> None:
    """A 256-byte tensor pointing at a 1.5 GiB file with no length: onnx reads the file
    whole. Refused naming both sizes before any read."""
    path = _model(tmp_path / "m.onnx", external=True)
    proto = onnx.load(str(path), load_external_data=False)
    [tensor] = proto.graph.initializer
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value="big.bin")
    onnx.save(proto, path)
    with (tmp_path / "big.bin").open("wb") as out:
        out.truncate(256 << 20)
    result, peak = peak_traced_bytes(lambda: load_source(path))
    assert isinstance(result, SourceModelError), repr(result)
    assert "declares 256 bytes of external data with no length, and big.bin holds " \
           "268,435,456" in result.message
    assert peak < 8 * MiB


def test_o_may_not_be_the_models_external_data_nor_a_target_profile(tmp_path: Path) -> None:
    """Both were replaced by the bundle, exit 0: the float weights lost."""
    path = _model(tmp_path / "m.onnx", external=True)
    data = tmp_path / "m.onnx.data"
    before = data.read_bytes()
    key, _ = generate_keypair(tmp_path / "keys", "t")
    with pytest.raises(DataError, match="is the source model's external data m.onnx.data"):
        convert(ConvertConfig(model=path, output=data, sign_key=key, format="onnx",
                              quantize="none"))
    assert data.read_bytes() == before
    profile = tmp_path / "prof.json"
    profile.write_text("{}")
    with pytest.raises(DataError, match="is the --target profile"):
        convert(ConvertConfig(model=path, output=profile, sign_key=key, format="onnx",
                              quantize="none", targets=(str(profile),)))
    assert profile.read_text() == "{}"


def test_an_image_pil_opens_but_cannot_decode_is_named(tmp_path: Path) -> None:
    """A PPM of a broken header named .png was a ValueError traceback (outside 14d, N6)."""
    (tmp_path / "a.png").write_bytes(b"P6\n25\xc5 25\n255\n" + bytes(64))
    with pytest.raises(DataError, match=r"cannot read image .*a\.png: ValueError"):
        load_dataset(tmp_path, [TensorInfo("image", (-1, 8, 8, 3), "float32")])


@pytest.mark.parametrize(("flag", "method", "says"), [
    (0x1, None, "encrypted"), (0, 9, "compression method is not supported")])
def test_an_npz_member_python_cannot_open_is_named(tmp_path: Path, flag: int,
                                                   method: int | None, says: str) -> None:
    """An encrypted member, or Deflate64 (Windows' compressed folders): tracebacks (N7)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ones((4, 4), np.float32))
    path = tmp_path / "z.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", buffer.getvalue())
    raw = bytearray(path.read_bytes())
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # local and central directory headers
        at = raw.index(header)
        flags_at, method_at = (at + 6, at + 8) if header == b"PK\x03\x04" else (at + 8, at + 10)
        raw[flags_at] |= flag
        if method is not None:
            raw[method_at:method_at + 2] = method.to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"z\.npz is not a readable \.npz file.*{says}"):
        load_dataset(path, SPEC)


# an EC key on secp112r1, a curve the cryptography package does not support (test data)
UNSUPPORTED_CURVE_KEY = b"""-----BEGIN EC PRIVATE KEY-----
MD4CAQEEDrKalaj+7CytdjFzaTxjoAcGBSuBBAAGoSADHgAECEuADMMMn46/G5xV
4aO2Y0gFr537huzKz4mltw==
-----END EC PRIVATE KEY-----
"""


def test_a_key_of_an_unsupported_curve_or_of_gigabytes_is_a_key_file_error(
        tmp_path: Path) -> None:
    """UnsupportedAlgorithm was a traceback (N8); a 3 GiB key was read whole (N9)."""
    from edgefleet.agent.protocol.errors import KeyFileError
    from edgefleet.agent.protocol.signing import SigningKey

    (tmp_path / "curve.key").write_bytes(UNSUPPORTED_CURVE_KEY)
    with pytest.raises(KeyFileError, match="is not supported"):
        SigningKey.load(tmp_path / "curve.key")
    with (tmp_path / "big.key").open("wb") as out:
        out.write(b"-----BEGIN PRIVATE KEY-----\n")
        out.truncate(3 << 30)
    result, peak = peak_traced_bytes(lambda: SigningKey.load(tmp_path / "big.key"))
    assert isinstance(result, KeyFileError) and "larger than 65,536 bytes" in result.message
    assert peak < 1 * MiB


def test_a_profile_nested_too_deep_or_of_gigabytes_is_a_profile_error(tmp_path: Path) -> None:
    """A RecursionError traceback, and a 3 GiB profile read whole (N10)."""
    from edgefleet.devices import ProfileError, load_profile

    (tmp_path / "nested.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ProfileError, match="RecursionError"):
        load_profile(str(tmp_path / "nested.json"))
    with (tmp_path / "big.json").open("wb") as out:
        out.write(b"{")
        out.truncate(3 << 30)
    with pytest.raises(ProfileError, match="not a device profile"):
        load_profile(str(tmp_path / "big.json"))


def test_an_input_named_labels_takes_its_array(tmp_path: Path) -> None:
    """Its array was read as class indices and refused (outside test 14d, N12)."""
    np.savez(tmp_path / "d.npz", labels=np.ones((5, 16), np.float32))
    data = load_dataset(tmp_path / "d.npz", [TensorInfo("labels", (-1, 16), "float32")])
    assert data.inputs["labels"].shape == (5, 16) and data.labels is None


def test_other_commands_read_certificates_bounded_and_say_json_errors(tmp_path: Path) -> None:
    """certs show /dev/zero read until the OOM killer, a FIFO hung; example-data into
    /proc was a traceback (outside test 14d, N11)."""
    import json
    import os
    import subprocess
    import sys

    os.mkfifo(tmp_path / "ff.crt")
    for path, says in (("/dev/zero", "not a regular file"),
                       (str(tmp_path / "ff.crt"), "not a regular file")):
        done = subprocess.run([sys.executable, "-m", "edgefleet", "certs", "show", path,
                               "--json"], capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 2 and says in json.loads(done.stdout)["message"]
    done = subprocess.run([sys.executable, "-m", "edgefleet", "example-data", "/proc/xx",
                           "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "cannot write the example data into /proc/xx" in json.loads(done.stdout)["message"]


@pytest.mark.parametrize(("op", "says"), [
    ("Cast", "output 'o' is a ndarray of object when the model runs"),
    ("SequenceConstruct", "output 'o' is a list when the model runs")])
def test_an_untyped_output_that_is_not_numeric_at_run_time_is_refused(
        tmp_path: Path, op: str, says: str) -> None:
    """Left to the runtime when undeclared, a string or sequence output crashed the
    packaging (outside test 14d, N19)."""
    node = helper.make_node("Cast", ["y"], ["o"], to=TensorProto.STRING) if op == "Cast" \
        else helper.make_node("SequenceConstruct", ["y", "y"], ["o"])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
         onnx.ValueInfoProto(name="o")],
        [numpy_helper.from_array(np.ones((16, 4), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    key, _ = generate_keypair(tmp_path / "keys", "t")
    with pytest.raises(SourceModelError, match=re.escape(says)):
        convert(ConvertConfig(model=tmp_path / "m.onnx", output=tmp_path / "m.efb",
                              sign_key=key, format="onnx", quantize="none"))
    assert not (tmp_path / "m.efb").exists()


def test_an_npz_directory_beyond_the_bound_is_refused_before_zipfile_reads_it(
        tmp_path: Path) -> None:
    """Many empty members (108 MB took 789 MB), or an end record claiming a directory of
    gigabytes (read whole): refused from the end record (outside test 14d, N17, N18)."""
    many = tmp_path / "many.npz"
    with zipfile.ZipFile(many, "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.ones((4, 4), np.float32))
        archive.writestr("x.npy", buffer.getvalue())
        for index in range(1100):
            archive.writestr(f"e{index}.npy", b"")
    claim = tmp_path / "claim.npz"
    end = b"PK\x05\x06" + bytes(6) + (1).to_bytes(2, "little") + \
        (3 << 30).to_bytes(4, "little") + (0).to_bytes(4, "little") + bytes(2)
    claim.write_bytes(b"PK\x03\x04" + bytes(64) + end)
    for path, says in ((many, "lists 1,101 members"), (claim, "directory of 3,221,225,472")):
        def read(p: Path = path) -> object:
            return load_dataset(p, SPEC)

        result, peak = peak_traced_bytes(read)
        assert isinstance(result, DataError), repr(result)
        assert says in result.message and peak < 4 * MiB


def test_a_model_file_above_2_gib_is_refused_before_it_is_read(tmp_path: Path) -> None:
    with (tmp_path / "zeros.onnx").open("wb") as out:
        out.truncate(3 << 30)
    result, peak = peak_traced_bytes(lambda: load_source(tmp_path / "zeros.onnx"))
    assert isinstance(result, SourceModelError) and "3.0 GiB" in result.message
    assert peak < 1 * MiB


def test_a_long_output_name_the_file_system_takes_is_written(tmp_path: Path) -> None:
    """A 250-character name was refused: its temporary file's name went past 255 (N21)."""
    from edgefleet.agent.protocol.files import atomic_write
    from edgefleet.converter.destination import check_writable

    long = tmp_path / ("a" * 246 + ".efb")
    check_writable(long)
    atomic_write(long, b"bundle")
    assert long.read_bytes() == b"bundle"
    assert [p.name for p in tmp_path.iterdir()] == [long.name]  # no temporary file left


def test_the_drift_reference_runs_in_calls_of_bounded_inputs(tmp_path: Path) -> None:
    """The packaging ran the whole evaluation set in one call: 1,500 images at 224x224
    took 6.7 GB (outside test 14d, N22)."""
    from edgefleet.agent.runtime.select import load_runtime
    from edgefleet.converter.evaluate import CALL_BYTES
    from edgefleet.converter.package import _run

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2], keepdims=0)], "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1024, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    runtime = load_runtime(model.SerializeToString(), "onnx")
    calls: list[int] = []
    run = runtime.run

    def counted(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(feeds["x"]))
        return run(feeds)

    runtime.run = counted  # type: ignore[method-assign]  # a spy on the real runtime
    rows = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 1024, 1024), np.float32)
    outputs = _run(runtime, {"x": rows})
    per_call = CALL_BYTES // (1024 * 1024 * 4)
    assert max(calls) <= per_call and sum(calls) == 10
    np.testing.assert_allclose(outputs["y"], np.arange(10, dtype=np.float32))


def test_a_fifo_bundle_and_a_fifo_or_endless_ca_key_are_refused_not_waited_on(
        tmp_path: Path) -> None:
    """device check / agent install of a FIFO hung (N24); certs device with a ca.key that
    is a FIFO hung, /dev/zero read until memory ran out (N23)."""
    import json
    import os
    import subprocess
    import sys

    from edgefleet.agent.protocol.bundle import read_manifest
    from edgefleet.agent.protocol.errors import BundleError

    os.mkfifo(tmp_path / "pipe.efb")
    with pytest.raises(BundleError, match="not a regular file"):
        read_manifest(tmp_path / "pipe.efb")
    done = subprocess.run([sys.executable, "-m", "edgefleet", "device", "check",
                           str(tmp_path / "pipe.efb"), "--target", "generic-x86_64", "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "not a regular file" in done.stdout
    for name in ("fifo", "zero"):
        folder = tmp_path / name
        folder.mkdir()
        if name == "fifo":
            os.mkfifo(folder / "ca.key")
        else:
            os.symlink("/dev/zero", folder / "ca.key")
        (folder / "ca.crt").write_text("")
        done = subprocess.run([sys.executable, "-m", "edgefleet", "certs", "device", "d1",
                               "--dir", str(folder), "--json"], capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 2, done.stderr
        assert "not a regular file" in json.loads(done.stdout)["message"]


def test_the_round_one_low_leftovers(tmp_path: Path) -> None:
    """The dims example no longer repeats the bad value; a profile's ONNX opset is at least
    1; PIL's bomb warning is not printed above the converter's own refusal; a kept source
    is not called slower than itself."""
    import json
    import subprocess
    import sys
    import warnings

    from PIL import Image

    from edgefleet.devices import ProfileError, load_profile

    done = subprocess.run([sys.executable, "-m", "edgefleet", "convert", "m.onnx", "-o",
                           str(tmp_path / "x.efb"), "--input-size", "1.5x2", "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    message = json.loads(done.stdout)["message"]
    assert "e.g. --input-size 320x320" in message or "expected HEIGHTxWIDTH" in message
    assert "e.g. --input-size 1.5x2" not in message
    base = json.loads(load_profile.__globals__["_profiles_dir"]().joinpath(
        "generic-x86_64.json").read_text())
    (tmp_path / "p.json").write_text(json.dumps({**base, "max_onnx_opset": -1}))
    with pytest.raises(ProfileError, match="max_onnx_opset"):
        load_profile(str(tmp_path / "p.json"))
    folder = tmp_path / "bomb"
    folder.mkdir()
    Image.new("1", (10000, 9000)).save(folder / "big.png")  # 90 M pixels: PIL only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="90,000,000 pixels"):
            load_dataset(folder, [TensorInfo("image", (-1, 8, 8, 3), "float32")])
