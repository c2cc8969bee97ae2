"""``edgefleet fleet alerts`` and ``edgefleet fleet drift``: model drift, as the fleet sees it.

Alerts are raised by the controller when a device's pooled drift windows differ from the
bundle's reference statistics by more than the model's PSI threshold (docs/monitoring.md).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from edgefleet.cli.fleet.common import DEFAULT_URL, ControllerOpt, JsonOpt, TokenOpt, client, run
from edgefleet.cli.output import console, emit, table

__all__ = ["alerts", "drift_app"]

drift_app = typer.Typer(help="When a model's drift raises an alert (PSI thresholds).",
                        no_args_is_help=True)


def alerts(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """Drift alerts firing now, worst first, and the fleet's PSI per model and feature."""
    data = run(as_json, lambda: client(controller, token).alerts())
    if as_json:
        emit(data, True, None)
        return
    rows = [{**a, "psi": f"{a['psi']:.3f}", "since": _ago(a["since_ms"])}
            for a in data["alerts"]]
    console.print(table(f"drift alerts firing: {len(rows)}", rows,
                        ["device", "model", "feature", "psi", "threshold", "samples", "since"]))
    summary = [{**r, "psi_max": f"{r['psi_max']:.3f}", "psi_mean": f"{r['psi_mean']:.3f}"}
               for r in data["summary"]]
    console.print(table("drift per model version (devices' latest pooled windows)", summary,
                        ["model", "feature", "devices", "firing", "psi_mean", "psi_max"]))


@drift_app.command("show")
def drift_show(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
               as_json: JsonOpt = False) -> None:
    """The models with their own thresholds, and the defaults for every other one."""
    data = run(as_json, lambda: client(controller, token).drift_policies())
    rows = [{"model": "(default)", **data["default"]},
            *({"model": name, **policy} for name, policy in sorted(data["models"].items()))]
    emit(data, as_json, table("drift alert policies", rows,
                              ["model", "psi", "min_samples", "clear_after"]))


@drift_app.command("set")
def drift_set(
    model: Annotated[str, typer.Argument(help="Model name")],
    psi: Annotated[float | None, typer.Option(help="Alert above this PSI (default 0.2)")] = None,
    min_samples: Annotated[int | None, typer.Option(
        help="Pool a device's windows until they hold this many requests (default 200)")] = None,
    clear_after: Annotated[int | None, typer.Option(
        help="Clear after this many pooled windows at or below the threshold (default 2)")
    ] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Back to the defaults")] = False,
    controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Set when MODEL's drift raises an alert (the options not given keep their value)."""
    data = run(as_json, lambda: client(controller, token).set_drift_policy(
        model, psi, min_samples, clear_after, reset))
    emit(data, as_json, table(f"drift alert policy of {model}", [data],
                              ["psi", "min_samples", "clear_after"]))


def _ago(ms: int) -> str:
    seconds = max(0, int(time.time() - ms / 1000))
    return f"{seconds}s ago" if seconds < 120 else time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
