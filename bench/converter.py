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
    return {"model": case["name"], "format": fmt, "mode": mode, "bytes": attempt.size_bytes,
            "accuracy": attempt.accuracy, "source_accuracy": report.source_accuracy,
            "top1": attempt.agreement.get("top1"), "cosine": min(attempt.agreement["cosine"]),
            "latency_ms": attempt.latency_p50_ms, "warnings": attempt.warnings,
            "seconds": round(time.perf_counter() - started, 2)}


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    floats = {(r["model"], r["format"]): r for r in rows if r["mode"] == "none" and "bytes" in r}
    for row in rows:
        base = floats.get((row["model"], row["format"]))
        if base and "bytes" in row:
            row["size_ratio"] = round(row["bytes"] / base["bytes"], 3)
            row["latency_ratio"] = round(row["latency_ms"] / base["latency_ms"], 3)
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


def report(rows: list[dict[str, Any]]) -> None:
    columns = ["model", "format", "mode", "bytes", "size ×float", "accuracy / top-1 / cosine",
               "latency ms", "latency ×float", "convert s", "int8 targets"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["model"], r["format"], r["mode"], "-", "-", r["error"], "-", "-",
                          "-", "refused (named reason)"])
            continue
        quality = (f"acc {r['accuracy']:.4f}" if r["accuracy"] is not None else
                   f"top-1 {r['top1']:.3f}, cos {r['cosine']:.4f}" if r["top1"] is not None
                   else f"cos {r['cosine']:.4f}")
        cells.append([r["model"], r["format"], r["mode"], r["bytes"], r.get("size_ratio", "-"),
                      quality, r["latency_ms"], r.get("latency_ratio", "-"), r["seconds"],
                      verdicts(r)])
    print_table("converter benchmark (ratios against the float conversion)", columns, cells)
    note = ("Each mode converted by `edgefleet convert` in one run; ratios against the float "
            "(`none`) conversion of the same model to the same format. digits-cnn is the "
            "trained 8×8 digits CNN (accuracy on 450 held-out digits); edge-cnn a 96×96×3 "
            "CNN with random weights (agreement on random inputs: its softmax is nearly flat, "
            "so cosine says more than top-1); PP-OCR and face detection "
            "are the published models, calibrated and compared on scikit-image's pictures. "
            "Raw numbers: `bench/results/converter.json`.")
    update_section("converter", "## Converter (`bench/converter.py`)\n\n" + note + "\n\n" +
                   markdown_table(columns, cells))


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
    write_results("converter", rows, {"modes": list(MODES)})
    report(rows)


if __name__ == "__main__":
    main()
