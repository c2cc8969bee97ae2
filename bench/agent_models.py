"""Memory of several models in one agent: RSS with two models against the sum of each alone.

Each configuration runs in a fresh process that imports the agent, serves the models of
its data dir (``local.serve_models``: the path of ``agent run``), sends 200 requests to
each model, then reads its own ``VmRSS``. The baseline process does the same with no
model. The sum to compare with is ``baseline + (A alone - baseline) + (B alone -
baseline)``; target: two models within 10% of it. Each figure is the median of 3 runs.

    python bench/agent_models.py
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, markdown_table, print_table, update_section, write_results
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair

ASSETS = ROOT / "edgefleet" / "demo_assets"
RUNS = 3
MiB = 1024 * 1024
# name -> model file: two runtimes (a detector on LiteRT, a keyword model on ONNX Runtime),
# and a second LiteRT model to see what one shared runtime saves
MODELS = {"detector": "digits.tflite", "keyword": "digits.onnx", "classifier": "digits.tflite"}
PAIRS = [("detector", "keyword"), ("detector", "classifier")]


def _bundles(work: Path, key: Path) -> dict[str, Path]:
    from edgefleet.agent.runtime import load_runtime
    from edgefleet.converter.package import PackageSpec, package_model

    x = np.load(ASSETS / "digits-sample.npz")["x"][:8]
    made = {}
    for name, file in MODELS.items():
        model = ASSETS / file
        runtime = load_runtime(model.read_bytes(), model.suffix.lstrip("."))
        made[name] = package_model(model, work / f"{name}.efb",
                                   PackageSpec(name, "1.0.0", {runtime.inputs[0].name: x}),
                                   SigningKey.load(key))
    return made


def _data_dir(work: Path, names: tuple[str, ...], bundles: dict[str, Path],
              trusted: TrustedKeys) -> Path:
    from edgefleet.agent.models import ModelSet
    from edgefleet.agent.update import local

    data = work / ("+".join(names) or "none")
    data.mkdir()
    models = ModelSet(trusted)
    for name in names:
        local.install_model(models, data, bundles[name])
    models.close()
    return data


def _child(data: Path, public: Path) -> None:
    """Serve what ``data`` holds, 200 requests a model, then print this process's RSS."""
    from edgefleet.agent.models import ModelSet
    from edgefleet.agent.update import local
    from edgefleet.agent.update.layout import installed

    importlib.import_module("edgefleet.agent.service")  # what agent run imports
    models = ModelSet(TrustedKeys.from_paths([public]))
    if installed(data):
        local.serve_models(models, data, resume=False)
    x = np.load(ASSETS / "digits-sample.npz")["x"][:1]
    for _ in range(200):
        for _, agent in models.items():
            agent.predict(x)
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines()
               if line.startswith("VmRSS:"))
    print(json.dumps({"rss_bytes": rss, "models": models.names()}))
    models.close()


def _rss(data: Path, public: Path) -> int:
    runs = []
    for _ in range(RUNS):
        done = subprocess.run([sys.executable, __file__, "--child", str(data), str(public)],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(int(json.loads(done.stdout.strip().splitlines()[-1])["rss_bytes"]))
    return int(statistics.median(runs))


def measure() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        secret, public = generate_keypair(work / "keys", "bench")
        trusted = TrustedKeys.from_paths([public])
        bundles = _bundles(work, secret)
        configs = [(), *[(name,) for name in MODELS], *PAIRS]
        rss = {names: _rss(_data_dir(work, names, bundles, trusted), public)
               for names in configs}
    base, rows = rss[()], []
    for a, b in PAIRS:
        expected = base + (rss[(a,)] - base) + (rss[(b,)] - base)
        rows.append({"pair": f"{a} ({MODELS[a]}) + {b} ({MODELS[b]})", "baseline": base,
                     "a_alone": rss[(a,)], "b_alone": rss[(b,)], "both": rss[(a, b)],
                     "expected": expected, "ratio": round(rss[(a, b)] / expected, 3)})
    return rows


def main() -> None:
    rows = measure()
    write_results("agent_models", rows, {"runs": RUNS})
    columns = ["models", "agent alone MiB", "A alone MiB", "B alone MiB", "A + B MiB",
               "sum MiB", "A + B ÷ sum"]
    cells = [[r["pair"], *(f"{r[k] / MiB:.1f}" for k in ("baseline", "a_alone", "b_alone",
                                                         "both", "expected")), r["ratio"]]
             for r in rows]
    print_table("agent RSS: two models against the sum of each alone", columns, cells)
    note = ("Each configuration in a fresh process that imports the agent, serves its data "
            "dir's models (the path of `agent run`) and sends 200 requests to each, then reads "
            "its VmRSS; median of 3 runs. \"sum\" is the agent alone plus what each model "
            "adds alone (A alone − agent alone, B alone − agent alone); target: A + B within "
            "10% of it. Raw numbers: `bench/results/agent_models.json`.")
    update_section("agent_models", "## Several models in one agent (`bench/agent_models.py`)"
                   "\n\n" + note + "\n\n" + markdown_table(columns, cells))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
