"""The version records of a checkpoint as columns (mmpack/repository/catalog/columns.py): generated
records read back as written, field by field, and the column-wide shard checks give the verdicts of
the per-record rules (``documents.check_shards``) on every generated list of objects."""

from __future__ import annotations

import base64
import dataclasses
import json
import pickle
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from mmpack import _json
from mmpack.approaches import APPROACHES
from mmpack.architecture import Architecture
from mmpack.records import Changes, ObjectRef, VersionRecord
from mmpack.repository.catalog import columns, documents

# Two architectures of different widths: change masks of mixed widths take the per-version path.
ARCHITECTURES = {a.fingerprint(): a for a in (
    Architecture.from_module(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))),
    Architecture.from_module(nn.Linear(2, 2)),
)}
FINGERPRINTS = sorted(ARCHITECTURES)
APPROACH_NAMES = list(APPROACHES)


@st.composite
def ranges(draw, n_models: int, table: bool, hostile: bool) -> list[tuple[int, int, bool]]:
    """(first, count, table) of a group of objects: a tiling of the set, or (``hostile``) often anything."""
    if not hostile or draw(st.integers(0, 2)):
        cuts = sorted(draw(st.sets(st.integers(1, max(1, n_models - 1)), max_size=3))) if n_models > 1 else []
        bounds = [0, *cuts, n_models]
        return [(a, b - a, table) for a, b in zip(bounds, bounds[1:]) if b > a or n_models == 0][:4]
    return [(draw(st.integers(0, n_models + 1)), draw(st.integers(0, n_models + 1)), table)
            for _ in range(draw(st.integers(0, 3)))]


@st.composite
def records(draw, shards: bool = True) -> list[VersionRecord]:
    """Versions that keep the rules of shards, but for the last, which may break any."""
    out = []
    token = iter(range(1, 10**6))
    count = draw(st.integers(2, 4)) if shards else draw(st.integers(1, 4))
    for number in range(1, count + 1):
        hostile = number == count
        name = draw(st.sampled_from(sorted(APPROACH_NAMES, reverse=hostile) if number > 1 else ["baseline"]))
        approach = APPROACHES[name]
        n_models = draw(st.integers(0, 6))
        fingerprint = draw(st.sampled_from(FINGERPRINTS))
        width = len(ARCHITECTURES[fingerprint])
        base = draw(st.integers(1, number - 1)) if number > 1 and (approach.delta or draw(st.booleans())) else None
        document = approach.object_kind == "document"
        if shards:
            spans = [(0, None, False)] if document else draw(ranges(n_models, False, hostile))
            tables = draw(ranges(n_models, True, hostile)) if approach.delta and draw(st.booleans()) else []
            order = draw(st.sampled_from(["kept", "shuffled", "a data object last"])) if hostile else "kept"
            if order == "a data object last" and spans and tables:
                spans = spans[1:] + tables + spans[:1]
            else:
                spans = spans + tables
                if order == "shuffled":
                    spans = draw(st.permutations(spans))
        else:
            spans = [(0, None, False)] + ([(0, None, True)] if approach.delta and draw(st.booleans()) else [])
        refs = tuple(
            ObjectRef(f"objects/{next(token):020x}" + (".provenance.json" if document and j == 0 else ".mmpack"),
                      draw(st.integers(0, 2**40)), draw(st.integers(0, 2**64 - 1)),
                      None if document and j == 0 else draw(st.none() | st.integers(0, 2**64 - 1)), *span)
            for j, span in enumerate(spans)
        )
        changes = None
        if approach.delta or (base is not None and draw(st.booleans())):
            models = np.array(sorted(draw(st.sets(st.integers(0, max(0, n_models - 1)), max_size=n_models))),
                              dtype=np.int64)
            masks = np.array(draw(st.lists(st.lists(st.booleans(), min_size=width, max_size=width),
                                           min_size=len(models), max_size=len(models))), dtype=bool)
            changes = Changes(models, masks.reshape(len(models), width))
        offset = timedelta(minutes=draw(st.integers(-23 * 60, 23 * 60)))
        created = datetime(2026, 1, 1, tzinfo=timezone(offset)) + timedelta(microseconds=draw(st.integers(0, 2**50)))
        out.append(VersionRecord(
            f"v{number}", name, None if base is None else f"v{base}", n_models, created,
            draw(st.text(max_size=5)), draw(st.text(max_size=5)), fingerprint, refs, changes,
            draw(st.sampled_from([{}, {"compression": "zstd-3"}])), draw(st.integers(0, 99)), draw(st.integers(0, 99)),
            approach.delta,
        ))
    return out


def round_trip(written: list[VersionRecord], shards: bool) -> list[VersionRecord]:
    body = json.loads(json.dumps(columns.encode(written, APPROACH_NAMES, FINGERPRINTS, shards=shards)))
    return columns.decode(body, APPROACH_NAMES, FINGERPRINTS, ARCHITECTURES, len(written) + 1, shards=shards)


def follows_the_rules(record: VersionRecord) -> bool:
    approach = APPROACHES[record.approach]
    try:
        documents.check_shards(record.objects, record.n_models, approach.delta, approach.object_kind == "document")
    except _json.Malformed:
        return False
    return True


def assert_same(read: VersionRecord, written: VersionRecord) -> None:
    for field in dataclasses.fields(VersionRecord):
        got, want = getattr(read, field.name), getattr(written, field.name)
        if field.name == "changes":
            assert (got is None) == (want is None)
            if want is not None:
                assert np.array_equal(got.models, want.models) and np.array_equal(got.masks, want.masks)
                assert got.masks.shape == want.masks.shape
        elif field.name == "created":
            assert got == want and got.utcoffset() == want.utcoffset()
        else:
            assert got == want, field.name


def breaking(name: str, n_models: int, spans: list[tuple[int, int | None, bool]]) -> list[VersionRecord]:
    """A valid Baseline ``v1`` of ``n_models`` models, then ``v2`` of approach ``name`` with objects
    of these ranges: each rule of shards broken once, whatever the generator happens to find."""
    fingerprint = FINGERPRINTS[0]
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    document = name == "provenance"

    def ref(j: int, span) -> ObjectRef:
        kind = ".provenance.json" if document and j == 0 else ".mmpack"
        return ObjectRef(f"objects/{j + 2:020x}{kind}", 1, 1, None, *span)

    base = VersionRecord("v1", "baseline", None, n_models, created, "", "", fingerprint,
                         (ObjectRef(f"objects/{1:020x}.mmpack", 1, 1, None, 0, n_models),), None)
    changes = Changes(np.array([0]), np.zeros((1, len(ARCHITECTURES[fingerprint])), dtype=bool))
    delta = APPROACHES[name].delta
    return [base, VersionRecord("v2", name, "v1", n_models, created, "", "", fingerprint,
                                tuple(ref(j, s) for j, s in enumerate(spans)), changes, delta=delta)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records())
@example(breaking("update", 4, [(0, 4, True), (0, 1, False)]))  # a data object after a table object
@example(breaking("update", 4, [(0, 2, False), (1, 2, False)]))  # overlapping
@example(breaking("update", 4, [(2, 0, False)]))  # empty
@example(breaking("update", 4, [(0, 1, False), (0, 3, True)]))  # tables that leave models out
@example(breaking("baseline", 4, [(0, 2, False), (3, 1, False)]))  # a gap
@example(breaking("baseline", 4, [(0, 4, False), (0, 4, True)]))  # a table object in a full version
@example(breaking("baseline", 4, [(1, 3, False)]))  # not from model 0
@example(breaking("baseline", 4, [(0, 5, False)]))  # beyond the set
@example(breaking("baseline", 4, []))  # nothing
@example(breaking("provenance", 4, [(0, None, False), (0, 4, False)]))  # a document and a data object
def test_the_shard_checks_of_a_checkpoint_agree_with_the_rules_of_a_record(written):
    if all(follows_the_rules(r) for r in written):
        read = round_trip(written, shards=True)
        assert len(read) == len(written)
        for r, w in zip(read, written):
            assert_same(r, w)
    else:
        with pytest.raises(_json.Malformed):
            round_trip(written, shards=True)


@settings(max_examples=100, deadline=None)
@given(records(shards=False))
def test_records_of_one_object_read_back_as_written(written):
    for r, w in zip(round_trip(written, shards=False), written, strict=True):
        assert_same(r, w)


@settings(max_examples=30, deadline=None)
@given(records(shards=False))
def test_a_record_read_from_columns_pickles_compares_and_replaces_as_a_plain_one(written):
    read = round_trip(written, shards=False)
    for r in read:
        plain = pickle.loads(pickle.dumps(r))
        assert type(plain) is VersionRecord
        assert_same(plain, r)
        assert r.id == plain.id and r.shards == plain.shards
        moved = dataclasses.replace(r, manifest_bytes=r.manifest_bytes + 1)
        assert moved.manifest_bytes == r.manifest_bytes + 1 and moved.objects == r.objects
        assert r != moved and r == r


@pytest.mark.parametrize("instant", [-(2**63), 2**63 - 1, -62135596800 * 10**6, 253402300799 * 10**6])
def test_a_time_no_datetime_holds_is_refused_when_the_checkpoint_is_read(instant):
    written = breaking("baseline", 4, [(0, 4, False)])
    body = json.loads(json.dumps(columns.encode(written, APPROACH_NAMES, FINGERPRINTS, shards=True)))
    body["created"] = base64.b64encode(np.array([0, instant], dtype="<i8").tobytes()).decode()
    with pytest.raises(_json.Malformed, match="years 1 to 9999"):
        columns.decode(body, APPROACH_NAMES, FINGERPRINTS, ARCHITECTURES, 3, shards=True)
    body["created"] = base64.b64encode(np.array([0, 0], dtype="<i8").tobytes()).decode()
    assert [r.created for r in columns.decode(body, APPROACH_NAMES, FINGERPRINTS, ARCHITECTURES, 3, shards=True)]
