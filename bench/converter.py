"""Converter benchmark: size, agreement or accuracy, latency and conversion time per mode.

Ratios are against the float (``none``) conversion of the same model to the same
format, measured in the same run. Targets: full int8 <= 0.28x the float size on
CNNs; digits int8 accuracy drop <= 1.0 point; int8 host latency <= 0.67x float,
or the never-slower guard's warning.

    python bench/converter.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.protocol.bundle import inspect_bundle
from agent.protocol.signing import generate_keypair
from bench.common import markdown_table, print_table, update_section, write_results
from converter.config import ConvertConfig
from converter.pipeline import ConversionFailed, convert
from tests import wheel_models
from tests.models import train_digits_cnn

MODES = ("none", "fp16", "dynamic", "int8")


def edge_cnn(out: Path) -> Path:
    """A MobileNet-sized CNN on 96x96x3 (random weights): a realistic size and speed."""
    from converter._tf import keras

    k = keras()
    k.utils.set_random_seed(0)
    layers: list[Any] = [k.Input((96, 96, 3), name="image")]
    for filters in (32, 64, 128, 128, 256):
        layers += [k.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu"),
                   k.layers.Conv2D(filters, 1, activation="relu")]
    layers += [k.layers.GlobalAveragePooling2D(), k.layers.Dense(10, activation="softmax")]
    model = k.Sequential(layers)
    path = out / "edge_cnn.keras"
    model.save(path)
    return path


def cases(work: Path) -> list[dict[str, Any]]:
    digits = train_digits_cnn(work / "digits")
    d = digits.digits
    np.savez(work / "digits-calib.npz", x=d.x_train[:200])
    np.savez(work / "digits-eval.npz", x=d.x_test, labels=d.y_test)
    rng = np.random.default_rng(0)
    np.savez(work / "edge-calib.npz", x=rng.random((64, 96, 96, 3), dtype=np.float32))
    images = wheel_models.sample_images(work / "images")
    digits_data = {"calibration": work / "digits-calib.npz", "eval": work / "digits-eval.npz"}
    edge = {"calibration": work / "edge-calib.npz"}
    return [
        {"name": "digits-cnn", "model": digits.keras, "formats": ("tflite", "onnx"),
         "modes": MODES, **digits_data},
        {"name": "edge-cnn", "model": edge_cnn(work), "formats": ("tflite", "onnx"),
         "modes": MODES, **edge},
        {"name": "ppocr-cls", "model": wheel_models.model("ppocr-cls"), "formats": ("onnx",),
         "modes": MODES, "calibration": images, "scale": "-1-1"},
        {"name": "ppocr-det", "model": wheel_models.model("ppocr-det"), "formats": ("onnx",),
         "modes": ("none", "int8"), "calibration": images},
        {"name": "face-detection", "model": wheel_models.model("face-detection"),
         "formats": ("tflite",), "modes": ("none", "dynamic", "int8"), "calibration": images,
         "scale": "-1-1"},
    ]


def run_one(case: dict[str, Any], fmt: str, mode: str, key: Path, out: Path) -> dict[str, Any]:
    config = ConvertConfig(model=case["model"], output=out / f"{case['name']}-{fmt}-{mode}.efb",
                           sign_key=key, format=fmt,  # type: ignore[arg-type]
                           quantize=mode,  # type: ignore[arg-type]
                           calibration=case.get("calibration"), eval=case.get("eval"),
                           scale=case.get("scale", "0-1"), quiet=True)
    started = time.perf_counter()
    try:
        report = convert(config)
    except ConversionFailed as failed:
        reason = failed.report.attempts[0].reason if failed.report.attempts else str(failed)
        return {"model": case["name"], "format": fmt, "mode": mode, "error": reason[:90]}
    attempt = report.chosen_attempt
    assert attempt is not None
    model = inspect_bundle(config.output).model_bytes
    return {"model": case["name"], "format": fmt, "mode": mode, "bytes": attempt.size_bytes,
            "weight_bytes": weight_bytes(model, fmt),
            "accuracy": attempt.accuracy, "source_accuracy": report.source_accuracy,
            "top1": attempt.agreement.get("top1"), "cosine": min(attempt.agreement["cosine"]),
            "latency_ms": attempt.latency_p50_ms,
            "reference_latency_ms": attempt.reference_latency_p50_ms, "warnings": attempt.warnings,
            "seconds": round(time.perf_counter() - started, 2)}


def weight_bytes(model: bytes, fmt: str) -> int:
    """Bytes of constant tensor data (weights, biases, scales): the rest is graph structure."""
    if fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load_model_from_string(model).graph
        tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant"
                                         for a in n.attribute if a.type == a.TENSOR)]
        return sum(numpy_helper.to_array(t).nbytes for t in tensors)
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAsModel(model, 0)
    return sum(root.Buffers(i).Size() or root.Buffers(i).DataLength()
               for i in range(root.BuffersLength()))


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    floats = {(r["model"], r["format"]): r for r in rows if r["mode"] == "none" and "bytes" in r}
    for row in rows:
        base = floats.get((row["model"], row["format"]))
        if base and "bytes" in row:
            row["size_ratio"] = round(row["bytes"] / base["bytes"], 3)
            row["weight_ratio"] = round(row["weight_bytes"] / base["weight_bytes"], 3)
            # against the reference timed alternately with it in the same conversion
            reference = (row.get("reference_latency_ms") or base["latency_ms"]
                         if row is not base else row["latency_ms"])
            row["latency_ratio"] = round(row["latency_ms"] / reference, 3)
        if row.get("accuracy") is not None and row.get("source_accuracy") is not None:
            row["drop_points"] = round((row["source_accuracy"] - row["accuracy"]) * 100, 2)
    return rows


def verdicts(row: dict[str, Any]) -> str:
    if "error" in row or row["mode"] != "int8":
        return ""
    notes = []
    if row["model"] in ("digits-cnn", "edge-cnn", "ppocr-cls", "ppocr-det"):
        notes.append("size ok" if row["size_ratio"] <= 0.28 else "size > 0.28x")
    if row["model"] == "digits-cnn":
        notes.append("drop ok" if row.get("drop_points", 99) <= 1.0 else "drop > 1 pt")
    fast = row["latency_ratio"] <= 0.67
    notes.append("latency ok" if fast else ("slower: guard warned" if row["warnings"] else
                                            "latency > 0.67x"))
    return ", ".join(notes)


def report(rows: list[dict[str, Any]], load: float, host: str) -> None:
    columns = ["model", "format", "mode", "bytes", "size ×float", "weights ×float",
               "accuracy / top-1 / cosine",
               "latency ms", "latency ×float", "convert s", "int8 targets"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["model"], r["format"], r["mode"], "-", "-", "-", r["error"], "-",
                          "-", "-", "refused (named reason)"])
            continue
        quality = (f"acc {r['accuracy']:.4f}" if r["accuracy"] is not None else
                   f"top-1 {r['top1']:.3f}, cos {r['cosine']:.4f}" if r["top1"] is not None
                   else f"cos {r['cosine']:.4f}")
        cells.append([r["model"], r["format"], r["mode"], r["bytes"], r.get("size_ratio", "-"),
                      r.get("weight_ratio", "-"), quality, r["latency_ms"],
                      r.get("latency_ratio", "-"), r["seconds"], verdicts(r)])
    print_table("converter benchmark (ratios against the float conversion)", columns, cells)
    note = ("Each mode converted by `edgefleet convert` in one run; ratios against the float "
            "(`none`) conversion of the same model to the same format. digits-cnn is the "
            "trained 8×8 digits CNN (accuracy on 450 held-out digits); edge-cnn a 96×96×3 "
            "CNN with random weights (agreement on random inputs: its softmax is nearly flat, "
            "so cosine says more than top-1); PP-OCR and face detection "
            "are the published models, calibrated and compared on scikit-image's pictures. "
            "Weights ×float: bytes of constant tensor data (weights, biases, scales, zero "
            "points) against the float conversion's; the rest of a file is graph structure "
            "(names, shapes, quantization parameters). Latency: p50 of one sample, one thread; "
            "latency ×float against the float model timed in alternating rounds within the "
            "same conversion (the never-slower guard's comparison), "
            f"on {host}{NO_VNNI if 'vnni' not in host else ''}. The host's 5-minute load "
            f"average at the end of the run was {load} on 2 cores "
            "(other work shares this machine: sub-millisecond latencies swing with it). "
            "Raw numbers: `bench/results/converter.json`.")
    update_section("converter", "## Converter (`bench/converter.py`)\n\n" + note + "\n\n" +
                   markdown_table(columns, cells) + MISSES)


NO_VNNI = (": without VNNI, int8 convolutions have no fast dot product, so int8 gains little "
           "or nothing over float here")
# Why the remaining misses miss: measured when they were analysed (2026-11-25, this host).
MISSES = """

**Why the remaining int8 misses miss** (measured on 2026-11-25 on this host, latency \
alternating float and int8 sessions; the table's latencies move with the host's load):

- *Size, digits-cnn* (tflite 0.367×, onnx 0.50×): the weights are quantized — constant \
data is 0.257× / 0.276× of the float's. The rest is graph: the float files already carry \
3.6 kB (tflite) / 3.1 kB (onnx) of structure beside 39.8 kB of weights, and 0.28× of the \
float file leaves 1.9 kB / 1.0 kB for it, less than the float model's own. Unreachable for a \
10k-parameter model whatever the quantizer; the target fits CNNs whose size is their weights \
(edge-cnn: 0.264× / 0.26×).
- *Size, PP-OCR* (cls 0.53×, det 0.32×): constant data is 0.333× (cls) and 0.275× (det). \
cls is a depthwise-heavy MobileNetV3 (127k parameters): a 3×3 depthwise channel has 9 int8 \
weights beside a float scale, a zero point and an int32 bias. The QDQ graphs add 400 (cls) \
and 1,100 (det) Q/DQ nodes whose generated names make 131 kB / 228 kB of structure; the \
shape annotations pre-processing left (24 kB / 35 kB) are now dropped. ONNX Runtime's \
QOperator format is smaller (cls 0.43×, fewer nodes) at the same speed: not adopted in this \
round, a candidate to measure next (it gives up the Q/DQ form that other runtimes and \
accelerators read). Renaming every tensor would shrink it further, but would make the node \
names in reports and device checks meaningless.
- *Latency, ONNX int8*: activations are now uint8. With int8 activations ONNX Runtime left \
the depthwise convolutions unfused (float Conv between Q/DQ round trips): cls 2.9× → 1.5×, \
det 1.8× → 1.0×, digits 1.8× → 1.3× float. What remains on cls (profiled): its 53 \
QLinearConv take as long as the float convolutions on this CPU, and the hard-swish's Div \
stays float between Q/DQ. Measured alternatives (cls / det agreement): per-tensor weights \
(top-1 0.96 / cosine 0.15), reduce_range (cosine 0.96 / 0.53), uint8 weights (0.98 / 0.71, \
and edge-cnn 0.79× instead of 0.67×), QOperator (same speed), Conv/MatMul only (1.7×): none \
is better on both models, so the guard warns.
- *Latency, TFLite int8* (digits, edge-cnn): this CPU has AVX2 but no VNNI; the TFLite \
int8 kernels measure 1.1–1.3× the float ones here (edge-cnn invoke() alone: 1.37 vs \
1.21 ms), and the guard warns. The previous table (another host) had 0.33× and 0.74×.
- *face-detection*: the int8 refusal was a converter bug — mediapipe writes operator codes \
only in the old schema field, ai-edge-quantizer read the new one (0 = ADD) and quantized \
convolution weights as activations (zero point 28), which LiteRT refused (XNNPACK reported \
it as "failed to delegate CONCATENATION node #88"). Fixed: both modes convert, and the \
folded float16 copies are no longer kept (dynamic was refused as not smaller at 635 kB, now \
156 kB; int8 337 kB, now 187 kB; the source's weights are already float16, so 0.5× of the \
source is the floor). But int8 agrees poorly (cosine 0.58; dynamic 0.92) and is slower \
(5×; dynamic 2.5×): with `--max-drop 2` both are refused by the budget. Why int8 is this \
slow was not diagnosed.
"""


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from rich.progress import Progress

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key, _ = generate_keypair(work / "keys", "bench")
        plan = [(c, f, m) for c in cases(work) for f in c["formats"] for m in c["modes"]]
        rows = []
        with Progress(transient=True) as progress:
            task = progress.add_task("converting", total=len(plan))
            for case, fmt, mode in plan:
                progress.update(task, description=f"{case['name']} {fmt} {mode}")
                rows.append(run_one(case, fmt, mode, key, work))
                progress.advance(task)
    rows = with_ratios(rows)
    load = round(os.getloadavg()[1], 2)  # 5-minute load average: this host is shared
    write_results("converter", rows, {"modes": list(MODES), "load_average_5min": load,
                                      "cpu": cpu()})
    report(rows, load, cpu())


def cpu() -> str:
    """The CPU model and its int8 dot-product extensions: int8 speed-ups depend on them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "unknown")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                  if line.startswith("flags")), set())
    int8 = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model} ({', '.join(int8) or 'no AVX2'})"


if __name__ == "__main__":
    main()
