"""The selector grammar: parsed once into a typed tree, printed back canonically, matched.

Property-tested: every tree the grammar can express prints to text that parses back to
the same tree; any text either parses or is refused with the project's error naming a
position inside it, within a memory bound; matching agrees with a reference evaluator
written independently of the tree's own ``matches``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.fleet.domain import Device, ModelState
from edgefleet.fleet.rollout.selector import (
    MAX_DEPTH,
    MAX_TEXT,
    AllOf,
    AnyOf,
    Attribute,
    Label,
    Selector,
    SelectorError,
    Target,
    Unreadable,
    expand,
    parse_selector,
    parse_stored_selector,
    storable,
)
from edgefleet.fleet.rollout.spec import RolloutSpec
from tests.hostile import HOSTILE, MiB, peak_traced_bytes

PI = Device(id="cam-1", fleet="f", group="cams", tags=frozenset({"outdoor"}),
            profile="raspberry-pi-4", arch="aarch64",
            runtimes={"litert": "1.4.0", "onnxruntime": "1.20.1"}, agent_version="0.9.0",
            active=BundleRef(name="digits", version="2.1.0", sha256="2" * 64),
            reported_labels={"site": "plant-a", "line": "3"}, labels={"line": "4"})
BARE = Device(id="old-1", fleet="f")  # reports nothing


@pytest.mark.parametrize(("text", "tree"), [
    ("group:cams", Selector("group", "cams")),
    ("device:cam-1", Selector("device", "cam-1")),
    ('tag:"north cams & co"', Selector("tag", "north cams & co")),
    ("profile=raspberry-pi-4", Attribute("profile", "=", "raspberry-pi-4")),
    ("label:site=plant-a", Label("site", "=", "plant-a")),
    ("label:site", Label("site")),
    ("runtime.litert>=1.2", Attribute("runtime.litert", ">=", "1.2")),
    (" profile = raspberry-pi-4 &label:site!=plant-b ",
     AllOf((Attribute("profile", "=", "raspberry-pi-4"), Label("site", "!=", "plant-b")))),
    ("arch=aarch64 | (model=digits & model.version<3)",
     AnyOf((Attribute("arch", "=", "aarch64"),
            AllOf((Attribute("model", "=", "digits"),
                   Attribute("model.version", "<", "3")))))),
])
def test_the_issue_s_examples_and_their_combinations_parse_into_their_tree(
        text: str, tree: Target) -> None:
    assert parse_selector(text) == tree


@pytest.mark.parametrize(("text", "matched"), [
    ("profile=raspberry-pi-4", True), ("profile!=raspberry-pi-4", False),
    ("arch=aarch64", True), ("arch=x86_64", False),
    ("runtime.litert>=1.2", True), ("runtime.litert>=1.10", False),  # 1.4 < 1.10
    ("runtime.litert=1.4", True), ("runtime.tflite-runtime>=0", False),
    ("runtime=onnxruntime", True), ("runtime!=onnxruntime", False),
    ("model=digits & model.version>=2.1.0 & model.version<2.2", True),
    ("agent>0.8.9", True), ("agent<0.9", False),
    ("label:site=plant-a", True), ("label:line=4", True), ("label:line=3", False),
    ("label:site", True), ("label:room", False), ("label:room!=x", True),
    ("group:cams & tag:outdoor & device:cam-1", True), ("group:other | tag:indoor", False),
])
def test_a_device_matches_by_what_it_reports_and_what_operators_set(
        text: str, matched: bool) -> None:
    assert parse_selector(text).matches(PI) is matched


@pytest.mark.parametrize(("text", "matched"), [
    ("profile=raspberry-pi-4", False), ("profile!=raspberry-pi-4", True),
    ("runtime.litert>=0", False), ("runtime.litert!=1", True), ("model.version<99", False),
    ("label:site!=plant-a", True), ("agent>=0", False)])
def test_a_device_that_reports_nothing_matches_only_what_it_is_not(
        text: str, matched: bool) -> None:
    assert parse_selector(text).matches(BARE) is matched


def test_a_version_a_device_reports_that_is_no_version_compares_with_nothing() -> None:
    odd = Device(id="d", fleet="f", runtimes={"litert": "nightly"})
    assert not parse_selector("runtime.litert>=1").matches(odd)
    assert not parse_selector("runtime.litert<1").matches(odd)


@pytest.mark.parametrize(("text", "position", "words"), [
    ("profile>3", 8, "compares with = or != only"),
    ("profile", 8, "expected an operator"),
    ("group:north cams", 13, 'group:"north cams"'),
    ("runtime.litert>=one", 17, "not a version"),
    ("colour=red", 1, "not an attribute"),
    ("site:plant-a", 1, "not a selector kind"),
    ("label:site>=2", 11, "label compares with = or !="),
    ('tag:"open', 5, "never closed"),
    ("profile==x", 8, "'==' is written '='"),
    ("(group:a", 9, "to close the parenthesis"),
    ("group:a &", 10, "expected a clause"),
    ("device:-x", 8, "no device id"),
    ("", 1, "empty"),
    ("group:" + "g" * 65, 7, "1-64 printable"),
])
def test_a_bad_selector_is_refused_naming_the_position_and_the_fix(
        text: str, position: int, words: str) -> None:
    with pytest.raises(SelectorError) as refused:
        parse_selector(text)
    assert refused.value.position + 1 == position, refused.value
    assert f"at character {position}" in str(refused.value)
    assert words in str(refused.value)
    assert refused.value.hint


@pytest.mark.parametrize(("text", "hint"), [
    ('group:""', "between the quotes"), ("group:" + "a" * 65, "shorten it"),
    ('tag:"a\tb"', "control characters")])
def test_a_bad_name_is_refused_with_a_hint_that_fits(text: str, hint: str) -> None:
    with pytest.raises(SelectorError) as refused:
        parse_selector(text)
    assert hint in refused.value.hint


def test_parentheses_are_bounded_in_depth() -> None:
    assert parse_selector("(" * MAX_DEPTH + "group:a" + ")" * MAX_DEPTH) == Selector("group", "a")
    with pytest.raises(SelectorError, match="parentheses inside each other"):
        parse_selector("(" * (MAX_DEPTH + 1) + "group:a" + ")" * (MAX_DEPTH + 1))


def test_a_stored_selector_of_an_earlier_edgefleet_still_loads() -> None:
    """Names were unquoted before the grammar: ``group:north cams`` is that group."""
    assert parse_stored_selector("group:north cams") == Selector("group", "north cams")
    assert parse_stored_selector("tag:a&b") == Selector("tag", "a&b")
    with pytest.raises(SelectorError):
        parse_stored_selector("device:a b")


def test_a_saved_group_is_replaced_by_its_selector_also_inside_others() -> None:
    saved = {"pis": parse_selector("profile=raspberry-pi-4"),
             "plant-a-pis": parse_selector("group:pis & label:site=plant-a"),
             "loop": parse_selector("group:loop | tag:x")}
    assert expand(parse_selector("group:plant-a-pis | device:d9"), saved) == AnyOf((
        AllOf((Attribute("profile", "=", "raspberry-pi-4"), Label("site", "=", "plant-a"))),
        Selector("device", "d9")))
    assert expand(Selector("group", "cams"), saved) == Selector("group", "cams")  # static
    assert expand(Selector("group", "loop"), saved) == AnyOf((Selector("group", "loop"),
                                                              Selector("tag", "x")))


def test_a_rollout_spec_stores_its_selectors_canonically_and_loads_them_back() -> None:
    spec = RolloutSpec(model=PI.active or BundleRef(name="x", version="1.0.0", sha256="1" * 64),
                       url="http://c/b.efb", size=1,
                       selectors=(parse_selector("profile = raspberry-pi-4&label:site=plant-a"),
                                  Selector("group", "north cams")))
    stored = spec.as_dict()
    assert stored["selectors"] == ["profile=raspberry-pi-4 & label:site=plant-a",
                                   'group:"north cams"']
    assert RolloutSpec.from_dict(stored) == spec


# --- properties -------------------------------------------------------------------------

# printable text (str.isprintable): no control, format, private, unassigned or separator
# characters but the ASCII space
NAMES = st.text(st.one_of(st.just(" "), st.characters(
    exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))),
    min_size=1, max_size=64)
WORDS = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
VERSIONS = st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,2}", fullmatch=True)
OPS = st.sampled_from(["=", "!=", ">=", "<=", ">", "<"])
LEAVES: st.SearchStrategy[Target] = st.one_of(
    st.builds(Selector, st.sampled_from(["group", "tag"]), NAMES),
    st.builds(Selector, st.just("device"), IDS),
    st.builds(Label, NAMES),
    st.builds(Label, NAMES, st.sampled_from(["=", "!="]), NAMES),
    st.builds(Attribute, st.sampled_from(["profile", "arch", "model", "runtime"]),
              st.sampled_from(["=", "!="]), NAMES),
    st.builds(Attribute, st.one_of(st.sampled_from(["model.version", "agent"]),
                                   WORDS.map(lambda w: f"runtime.{w}")), OPS, VERSIONS))
TREES: st.SearchStrategy[Target] = st.recursive(
    LEAVES, lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=4).map(lambda p: AllOf(tuple(p))),
        st.lists(inner, min_size=2, max_size=4).map(lambda p: AnyOf(tuple(p)))),
    max_leaves=10)


@HOSTILE
@given(tree=TREES)
def test_any_tree_prints_to_text_that_parses_back_to_it(tree: Target) -> None:
    text = str(tree)
    assert parse_stored_selector(text) == tree  # long or not: what is stored reads back
    assert storable(tree, "it") == tree
    if len(text) <= MAX_TEXT:
        assert parse_selector(text) == tree
        assert str(parse_selector(text)) == text


def _compact(tree: Target) -> str:
    """``tree`` as short as people may write it: no spaces, parentheses only where the
    precedence needs them (an ``|`` inside an ``&``, or a group inside one of its kind)."""
    if isinstance(tree, AllOf):
        return "&".join(f"({_compact(p)})" if isinstance(p, AllOf | AnyOf) else _compact(p)
                        for p in tree.parts)
    if isinstance(tree, AnyOf):
        return "|".join(f"({_compact(p)})" if isinstance(p, AnyOf) else _compact(p)
                        for p in tree.parts)
    return str(tree)


# long texts (about a thousand characters written compactly) and deep ones (about 16
# parentheses), where the canonical text passes the bounds for people
SHORT_LEAVES: st.SearchStrategy[Target] = st.one_of(
    st.builds(Selector, st.sampled_from(["group", "tag"]), WORDS),
    st.builds(Label, WORDS, st.sampled_from(["=", "!="]), WORDS))
FIVE = st.from_regex(r"[a-z0-9]{5}", fullmatch=True)


def _wide(all_of: bool, kind: str, names: list[str]) -> Target:
    parts = tuple(Selector(kind, name) for name in names)
    return AllOf(parts) if all_of else AnyOf(parts)


WIDE_TREES: st.SearchStrategy[Target] = st.builds(  # 849-999 characters
    _wide, st.booleans(), st.sampled_from(["group", "tag"]),
    st.integers(85, 100).flatmap(lambda n: st.lists(FIVE, min_size=n, max_size=n)))


def _chain(leaves: list[Target]) -> Target:
    """``a|(b|(c|...(x&y)))``: one level per leaf, an ``&`` inside the last ``|``."""
    tree: Target = AnyOf((AllOf((leaves[0], leaves[1])), leaves[2]))
    for leaf in leaves[3:]:
        tree = AnyOf((leaf, tree))
    return tree


DEEP_TREES = st.integers(17, 20).flatmap(  # 19 leaves: 16 deep, stored 17 deep
    lambda n: st.lists(SHORT_LEAVES, min_size=n, max_size=n)).map(_chain)


@settings(HOSTILE, max_examples=max(20, (HOSTILE.max_examples or 100) // 4))
@given(tree=st.one_of(TREES, WIDE_TREES, DEEP_TREES))
def test_whatever_people_may_write_is_stored_as_text_that_reads_back(tree: Target) -> None:
    """Text within the bounds for people (1,000 characters, 16 parentheses deep) is
    stored canonically (spaces, parentheses), which may pass those bounds: it still reads
    back as the same tree, never as something else."""
    text = _compact(tree)
    try:
        parsed = parse_selector(text)
    except SelectorError as refused:  # only ever for the bounds for people
        assert len(text) > MAX_TEXT or "parentheses" in refused.message
        return
    assert parsed == tree
    stored = str(storable(parsed, "it"))
    assert parse_stored_selector(stored) == parsed


def _depth(text: str) -> int:
    deepest = level = 0
    for char in text:
        level += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, level)
    return deepest


@pytest.mark.parametrize("text", [
    # 999 characters without spaces: canonically (" | ") 1,293
    "label:site=nowhere|" + "|".join(f"tag:t{i:03d}" for i in range(98)),
    # 16 parentheses deep with an & inside an |: canonically 17 deep, and it starts with
    # tag: (an earlier edgefleet's unquoted tag name must not be read instead)
    "tag:a|(" * 16 + "device:b-00004&tag:c|device:b-00004" + ")" * 16,
])
def test_a_selector_at_the_bounds_is_stored_as_text_that_reads_back(text: str) -> None:
    tree = parse_selector(text)
    stored = str(tree)
    assert len(stored) > MAX_TEXT or _depth(stored) > MAX_DEPTH  # past the bounds for people
    assert parse_stored_selector(stored) == tree
    assert not isinstance(parse_stored_selector(stored), Selector)


def test_an_unreadable_stored_selector_is_not_read_as_one_tag_and_a_spec_keeps_it() -> None:
    with pytest.raises(SelectorError):
        parse_stored_selector("tag:a | (" * 70 + "tag:b" + ")" * 70)
    with pytest.raises(SelectorError):  # 65 characters: no name of an earlier edgefleet
        parse_stored_selector("tag:" + "(" * 65)
    spec = RolloutSpec(model=BundleRef(name="x", version="1.0.0", sha256="1" * 64),
                       url="http://c/b.efb", size=1, selectors=(Selector("tag", "a"),))
    stored = {**spec.as_dict(), "selectors": ["label:site=(", "tag:a"]}
    loaded = RolloutSpec.from_dict(stored)
    assert isinstance(loaded.selectors[0], Unreadable)
    assert "label:site=(" in (loaded.unreadable() or "")
    assert loaded.as_dict()["selectors"] == ["label:site=(", "tag:a"]  # kept as it was
    assert not loaded.matches(PI)


GRAMMAR_SOUP = st.lists(st.sampled_from(
    [*"()&|:=!<> \"\\.-_", "group", "tag", "device", "label", "profile", "runtime.x",
     "model.version", "1.2", "a", "é", "\n", "\x00"]),
    max_size=80).map("".join)


@settings(HOSTILE, deadline=timedelta(seconds=2))
@given(text=st.one_of(st.text(max_size=3000), GRAMMAR_SOUP))
def test_any_text_parses_or_is_refused_naming_a_position_within_bounds(text: str) -> None:
    result, peak = peak_traced_bytes(lambda: parse_selector(text))
    assert peak < 2 * MiB, peak
    if isinstance(result, BaseException):
        assert isinstance(result, SelectorError), repr(result)
        assert 0 <= result.position <= len(text)
        assert result.hint
        return
    assert parse_stored_selector(str(result)) == result  # stored canonically, read back
    if len(str(result)) <= MAX_TEXT:
        assert parse_selector(str(result)) == result  # what parses is canonical text too


# a reference for matching: the device as plain facts, the tree walked by hand
def _facts(device: Device) -> dict[str, Any]:
    active = device.active
    return {"id": device.id, "group": device.group, "tags": set(device.tags),
            "labels": {**device.reported_labels, **device.labels},
            "profile": device.profile, "arch": device.arch,
            "model": active.name if active else None,
            "model.version": active.version if active else None,
            "agent": device.agent_version, "runtimes": dict(device.runtimes)}


def _reference(tree: Target, facts: dict[str, Any]) -> bool:
    if isinstance(tree, AllOf):
        return all(_reference(p, facts) for p in tree.parts)
    if isinstance(tree, AnyOf):
        return any(_reference(p, facts) for p in tree.parts)
    if isinstance(tree, Selector):
        key = {"group": "group", "device": "id"}.get(tree.kind)
        return tree.value in facts["tags"] if key is None else bool(facts[key] == tree.value)
    if isinstance(tree, Label):
        have = facts["labels"].get(tree.key)
        return have is not None if tree.op is None else (
            have == tree.value if tree.op == "=" else have != tree.value)
    assert isinstance(tree, Attribute)
    return _reference_attribute(tree, facts)


def _reference_attribute(tree: Attribute, facts: dict[str, Any]) -> bool:
    if tree.name == "runtime":
        return (tree.value in facts["runtimes"]) is (tree.op == "=")
    have = (facts["runtimes"].get(tree.name[8:]) if tree.name.startswith("runtime.")
            else facts[tree.name])
    if have is None:
        return tree.op == "!="
    if tree.name in ("profile", "arch", "model"):
        return (have == tree.value) is (tree.op == "=")
    a, b = Version(have), Version(tree.value)
    return {"=": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b,
            "<": a < b}[tree.op]


SMALL = st.sampled_from(["a", "b", "plant-a", "raspberry-pi-4", "aarch64", "1.2", "x y"])
DEVICES = st.builds(
    Device, id=st.sampled_from(["d1", "d2", "cam-1"]), fleet=st.just("f"),
    group=st.one_of(st.none(), SMALL), tags=st.frozensets(SMALL, max_size=3),
    profile=st.one_of(st.none(), SMALL), arch=st.one_of(st.none(), SMALL),
    runtimes=st.dictionaries(st.sampled_from(["litert", "onnxruntime", "a"]),
                             st.sampled_from(["1", "1.2", "1.10.0", "2.0", "nightly"]),
                             max_size=3),
    agent_version=st.one_of(st.none(), st.sampled_from(["0.9.0", "1.2", "bad"])),
    reported_labels=st.dictionaries(SMALL, SMALL, max_size=3),
    labels=st.dictionaries(SMALL, SMALL, max_size=2),
    active=st.one_of(st.none(), st.builds(BundleRef, name=st.sampled_from(["a", "digits"]),
                                          version=st.sampled_from(["1.0.0", "1.2.0"]),
                                          sha256=st.just("1" * 64))))
SMALL_LEAVES: st.SearchStrategy[Target] = st.one_of(
    st.builds(Selector, st.sampled_from(["group", "tag"]), SMALL),
    st.builds(Selector, st.just("device"), st.sampled_from(["d1", "cam-1"])),
    st.builds(Label, SMALL), st.builds(Label, SMALL, st.sampled_from(["=", "!="]), SMALL),
    st.builds(Attribute, st.sampled_from(["profile", "arch", "model", "runtime"]),
              st.sampled_from(["=", "!="]), st.sampled_from(["a", "litert", "digits"])),
    st.builds(Attribute, st.sampled_from(["model.version", "agent", "runtime.litert",
                                          "runtime.a"]), OPS,
              st.sampled_from(["0", "1", "1.2", "1.10", "2"])))
SMALL_TREES = st.recursive(SMALL_LEAVES, lambda inner: st.one_of(
    st.lists(inner, min_size=2, max_size=3).map(lambda p: AllOf(tuple(p))),
    st.lists(inner, min_size=2, max_size=3).map(lambda p: AnyOf(tuple(p)))), max_leaves=8)


def _safe_reference(tree: Target, facts: dict[str, Any]) -> bool:
    try:
        return _reference(tree, facts)
    except Exception:  # the reference's Version() of a reported "bad": a non-match
        return _reference(_without_bad_versions(tree, facts), facts)


def _without_bad_versions(tree: Target, facts: dict[str, Any]) -> Target:
    """A version clause about a reported text that is no version matches nothing."""
    never = Selector("device", "no-such-device")
    if isinstance(tree, AllOf | AnyOf):
        return type(tree)(tuple(_without_bad_versions(p, facts) for p in tree.parts))
    if isinstance(tree, Attribute) and tree.name not in ("profile", "arch", "model",
                                                         "runtime"):
        have = (facts["runtimes"].get(tree.name[8:]) if tree.name.startswith("runtime.")
                else facts[tree.name])
        if have is not None:
            try:
                Version(have)
            except ValueError:
                return never
    return tree


@HOSTILE
@given(tree=SMALL_TREES, device=DEVICES)
def test_matching_agrees_with_a_reference_evaluator(tree: Target, device: Device) -> None:
    assert tree.matches(device) is _safe_reference(tree, _facts(device))
    assert parse_selector(str(tree)).matches(device) is tree.matches(device)


CAMERA = Device(id="cam-2", fleet="f", models={
    "detector": ModelState(active=BundleRef(name="detector", version="3.0.0", sha256="3" * 64)),
    "classifier": ModelState(active=BundleRef(name="classifier", version="1.2.0",
                                              sha256="4" * 64)),
    "kws": ModelState()})  # known by name, nothing active: it runs no kws


@pytest.mark.parametrize(("text", "expected"), [
    ("model=detector", True), ("model=classifier", True), ("model=kws", False),
    ("model!=kws", True), ("model!=detector", False),
    ("model.version>=3", True), ("model.version<1", False),
    ("model=classifier & model.version<2", True),
    # the model clauses of one selector read one model: detector is 3.0.0
    ("model=detector & model.version<2", False), ("model=detector & model.version>=3", True),
    ("model=detector & model.version!=3.0.0", False), ("model.version!=3.0.0", True),
    ("(model=detector | model=kws) & model.version=1.2.0", False),
    ("model!=kws & model.version=1.2.0", True), ("model!=detector & model.version<2", False),
    ("model=detector & model=classifier", False), ("model=detector | model=classifier", True),
])
def test_a_device_of_several_models_matches_when_one_of_its_models_does(
        text: str, expected: bool) -> None:
    assert parse_selector(text).matches(CAMERA) is expected


# several models: the reference tries each model in turn, every model clause read of it
MODEL_LEAVES: st.SearchStrategy[Target] = st.one_of(
    st.builds(Attribute, st.just("model"), st.sampled_from(["=", "!="]),
              st.sampled_from(["digits", "keyword", "kws"])),
    st.builds(Attribute, st.just("model.version"), OPS,
              st.sampled_from(["1", "1.0.0", "2", "3.0.0"])),
    st.builds(Selector, st.just("tag"), st.sampled_from(["a", "b"])))
MODEL_TREES = st.recursive(MODEL_LEAVES, lambda inner: st.one_of(
    st.lists(inner, min_size=2, max_size=3).map(lambda p: AllOf(tuple(p))),
    st.lists(inner, min_size=2, max_size=3).map(lambda p: AnyOf(tuple(p)))), max_leaves=6)
MODEL_SETS = st.dictionaries(st.sampled_from(["digits", "keyword", "kws"]),
                             st.sampled_from(["1.0.0", "2.0.0", "3.0.0"]), max_size=3)


def _reference_bound(tree: Target, tags: frozenset[str], names: list[str],
                     model: tuple[str, str] | None) -> bool:
    if isinstance(tree, AllOf):
        return all(_reference_bound(p, tags, names, model) for p in tree.parts)
    if isinstance(tree, AnyOf):
        return any(_reference_bound(p, tags, names, model) for p in tree.parts)
    if isinstance(tree, Selector):
        return tree.value in tags
    assert isinstance(tree, Attribute)
    if tree.name == "model" and tree.op == "!=":
        return tree.value not in names  # none of its models
    if model is None:
        return tree.op == "!="
    if tree.name == "model":
        return model[0] == tree.value
    a, b = Version(model[1]), Version(tree.value)
    return {"=": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b,
            "<": a < b}[tree.op]


@HOSTILE
@given(tree=MODEL_TREES, models=MODEL_SETS, tags=st.frozensets(st.sampled_from(["a", "b"])))
def test_the_model_clauses_of_a_selector_read_one_model_of_a_device(
        tree: Target, models: dict[str, str], tags: frozenset[str]) -> None:
    device = Device(id="d", fleet="f", tags=tags, models={
        name: ModelState(active=BundleRef(name=name, version=version, sha256="1" * 64))
        for name, version in models.items()})
    refs: list[tuple[str, str] | None] = [*sorted(models.items())] or [None]
    expected = any(_reference_bound(tree, tags, list(models), m) for m in refs)
    assert tree.matches(device) is expected
    assert parse_selector(str(tree)).matches(device) is expected
