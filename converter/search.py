"""``--quantize auto``: an accuracy-aware search over recipes, smallest first.

The ladder, for each path (docs/converter.md has the table):

1. full int8 (ONNX: MinMax, then Percentile and Entropy calibration when MinMax misses);
2. the other recipes about as small (float TFLite sources: weight-only int8, dynamic
   range; Keras -> TFLite: dynamic range), tried even when full int8 passed, since
   one of them can be smaller;
3. **mixed**: the best full-int8 recipe with the operators that lose most SQNR kept in
   float (:mod:`edgefleet.converter.sensitivity`), 1, 2, 4, 8, ... of them, until the budget holds
   (skipped when no ranking was measured: the ranking failed, or ranked nothing);
4. fp16 (for a float16-stored TFLite source: the source as it is);
5. float: the model unquantized (float32), when not even fp16 held the budget (an ONNX
   model whose activations overflow float16, say). It agrees with the source exactly, so
   ``auto`` always returns a model within the accuracy budget, never a broken one; only
   a device's size or memory limit can still refuse it.

Every candidate is measured and becomes a report row; the pipeline keeps the smallest
accepted (:func:`choose`): sizes within :data:`TIE_BAND` of the smallest count as a tie,
which the fastest of them wins (a candidate 0.3 % smaller but 2.7x slower is not chosen).
Mixed, fp16 and float run only when nothing smaller passed (everything after
them is larger); no candidate starts once the search budget (seconds) is spent, except
fp16 and float, which are always tried last when nothing passed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from edgefleet.converter.report import Attempt, Verdict

__all__ = ["DEFAULT_SEARCH_SECONDS", "KEEP_STEPS", "TIE_BAND", "Candidate", "auto_candidates",
           "choose"]

DEFAULT_SEARCH_SECONDS = 480.0  # a 10M-parameter model finishes under 10 minutes on 2 cores
KEEP_STEPS = (1, 2, 4, 8, 16, 32, 64)  # operators kept in float, tried in this order
TIE_BAND = 0.05  # accepted sizes within 5 % of the smallest are a tie: the fastest wins


def choose(attempts: Sequence[Attempt]) -> Attempt | None:
    """The accepted attempt to write: the fastest of those within :data:`TIE_BAND` of the
    smallest accepted size (the smallest when latency was not measured); None when none
    was accepted."""
    accepted = [a for a in attempts if a.accepted and a.size_bytes is not None]
    if not accepted:
        return None
    smallest = min(a.size_bytes or 0 for a in accepted)
    tied = [a for a in accepted if (a.size_bytes or 0) <= smallest * (1 + TIE_BAND)]
    return min(tied, key=lambda a: (a.latency_p50_ms if a.latency_p50_ms is not None
                                    else math.inf, a.size_bytes or 0))


@dataclass(frozen=True)
class Candidate:
    """One recipe to build and measure."""

    label: str
    mode: str  # none, fp16, dynamic, weight-only, int8, int8-a16
    keep_float: tuple[str, ...] = ()
    method: str = "minmax"  # ONNX calibration: minmax, percentile, entropy
    activations: str = "uint8"  # ONNX activations: uint8 or int8


@dataclass
class Search:
    """What the search needs from the pipeline: the path, the attempts so far, a ranking."""

    kind: str  # source kind
    fmt: str
    attempts: list[Attempt]
    rank: Callable[[Candidate], Sequence[str]]  # operators, most sensitive first
    seconds: float = DEFAULT_SEARCH_SECONDS
    started: float = field(default_factory=time.perf_counter)
    stopped: str = ""  # why the search stopped early, when it did
    notes: list[str] = field(default_factory=list)  # for the report's warnings

    def out_of_time(self, next_label: str) -> bool:
        spent = time.perf_counter() - self.started
        if spent <= self.seconds:
            return False
        self.stopped = (f"search budget of {self.seconds:g} s spent ({spent:.0f} s) before "
                        f"{next_label}; --search-budget raises it")
        return True


def auto_candidates(search: Search) -> Iterator[Candidate]:
    """Yield candidates smallest first until one is accepted or time runs out.

    Full int8 and the recipes about as small form one tier: all of it is tried (the
    first full int8 accepted ends the calibration variants), so the smallest of the tier
    wins; the mixed and fp16 stages only run when nothing in it passed.
    """
    full: list[Candidate] = []
    for candidate in [*_full_int8(search), *_others(search)]:
        if candidate.mode == "int8" and _accepted(search):
            continue  # another calibration of an accepted full int8 is no smaller
        if search.out_of_time(candidate.label):
            break
        yield candidate
        if candidate.mode == "int8":
            full.append(candidate)
    else:
        if not _accepted(search):
            yield from _mixed(search, _best(search, full))
    if not _accepted(search):
        yield Candidate("fp16", "fp16")
    if not _accepted(search):
        search.notes.append(_stays_float(search.attempts))
        yield Candidate("float", "none")


def _stays_float(attempts: Sequence[Attempt]) -> str:
    """Why the model stays float32: recipes that missed the budget, and recipes that failed
    to build or run (an error, not a miss)."""
    failed = [a.label for a in attempts if a.verdict is Verdict.FAILED]
    missed = [a.label for a in attempts if a.verdict is not Verdict.FAILED]
    parts = []
    if missed:
        parts.append(f"{', '.join(missed)} missed the budget or the targets (by how much: "
                     "their rows above)")
    if failed:
        parts.append(f"{', '.join(failed)} failed with an error (their rows above say which): "
                     "not a miss")
    return ("no recipe smaller than float was accepted: the model stays float32; "
            + "; ".join(parts))


def _full_int8(search: Search) -> list[Candidate]:
    if search.fmt == "onnx":
        return [Candidate("int8", "int8"),
                Candidate("int8-percentile", "int8", method="percentile"),
                Candidate("int8-entropy", "int8", method="entropy")]
    return [Candidate("int8", "int8")]


def _others(search: Search) -> list[Candidate]:
    if search.kind == "tflite":
        return [Candidate("weight-only", "weight-only"), Candidate("dynamic", "dynamic")]
    if search.fmt == "tflite":
        return [Candidate("dynamic", "dynamic")]
    return []  # ONNX Runtime's dynamic int8 ran 4-8x slower than float on CNNs here


def _accepted(search: Search) -> bool:
    return any(a.accepted for a in search.attempts)


def _best(search: Search, full: list[Candidate]) -> Candidate | None:
    """The full-int8 candidate whose worst output came closest to the source."""
    scored = [(a.agreement.get("worst_score", -1.0), c) for c in full for a in search.attempts
              if a.label == c.label and a.size_bytes is not None]
    return max(scored, key=lambda s: s[0])[1] if scored else None


def _mixed(search: Search, base: Candidate | None) -> Iterator[Candidate]:
    if base is None or search.out_of_time("int8-mixed"):
        return
    ranking = list(search.rank(base))
    if not ranking:  # nothing measured (the ranking's warning says why): no mixed stage
        return
    for count in [k for k in KEEP_STEPS if k <= max(1, len(ranking) // 2)]:
        label = f"{base.label}-mixed-{count}"
        if search.out_of_time(label):
            return
        yield Candidate(label, base.mode, tuple(ranking[:count]), base.method, base.activations)
        if _accepted(search):
            return
