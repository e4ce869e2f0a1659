"""Hostile repositories: objects exchanged for others, manifests edited with their checksum kept
consistent. Every read path either returns the version's own models or raises a typed error;
``verify`` reports every problem and never raises."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from forgery import read_record, write_record
from helpers import ffnn_models, mixed_models
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_repository import retrain

from mmpack import Compression, IntegrityError, MMPackError, ModelSet, Repository

N = 12


def read_manifest(root, vid: str) -> dict:
    """The record of ``vid`` as the catalog stores it (a format 1 manifest's body; a format 2
    commit's entry)."""
    return read_record(root, vid)


def write_manifest(root, vid: str, body: dict) -> None:
    """Replace every copy of a record by ``body``, checksums recomputed (as an attacker would)."""
    write_record(root, vid, body)


def object_path(root, ref: dict) -> str:
    return os.path.join(root, *ref["key"].split("/"))


def exchange(root, a: dict, b: dict) -> None:
    """Swap the files of two objects (a botched copy, a restore from the wrong backup)."""
    pa, pb = object_path(root, a), object_path(root, b)
    os.rename(pa, pa + ".swap")
    os.rename(pb, pa)
    os.rename(pa + ".swap", pb)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """v1, v2: Baselines of same-shaped sets; v3, v4: Updates on v1 with the same row counts;
    v5, v6: compressed Baselines; v7: compressed XOR Update on v5; v8: a set of another architecture."""
    root = tmp_path_factory.mktemp("hostile") / "repo"
    repo = Repository(root, fsync=False)
    first = ModelSet.from_modules(ffnn_models(N, seed=1))
    second = ModelSet.from_modules(ffnn_models(N, seed=2))
    sets = {}
    sets[repo.save(first)] = first
    sets[repo.save(second)] = second
    for changed in ([1, 2], [5, 7]):
        ms = retrain(first, changed, [])
        sets[repo.save(ms, approach="update", base="v1")] = ms
    sets[repo.save(first, compression="zstd")] = first
    sets[repo.save(second, compression="zstd")] = second
    ms = retrain(first, [3], [8])
    sets[repo.save(ms, approach="update", base="v5", compression=Compression())] = ms
    other = ModelSet.from_modules(mixed_models(N))
    sets[repo.save(other)] = other
    assert list(sets) == [f"v{i}" for i in range(1, 9)]
    return root, sets


@pytest.fixture
def copy(history, tmp_path):
    """A fresh copy of the history's repository to damage."""
    root, sets = history
    target = tmp_path / "repo"
    shutil.copytree(root, target)
    return target, sets


def read_paths(root, vid: str):
    """Every way to read version ``vid`` as (name, models read or None for all, read), each in a
    fresh Repository (nothing cached)."""
    yield "recover", None, lambda: Repository(root).recover(vid)
    yield "recover one", [N - 1], lambda: Repository(root).recover(vid, indices=[N - 1])
    yield "recover two", [0, 5], lambda: Repository(root).recover(vid, indices=[0, 5])
    yield "recursive", None, lambda: Repository(root).recover(vid, strategy="recursive")
    yield "hashes", None, lambda: Repository(root).hashes(vid)
    try:
        models = Repository(root).version(vid).changes.models.tolist()[::-1]
    except (MMPackError, AttributeError):  # no readable change list: the paths above cover it
        return
    # The models a delta's own object holds (its unchanged models come from its bases).
    yield "recover changed", models, lambda: Repository(root).recover(vid, indices=models)


def returned_the_version(found, expected: ModelSet, models) -> bool:
    if not isinstance(found, ModelSet):
        return np.array_equal(found, expected.hashes())
    return found.equal(expected if models is None else expected.select(models))


def assert_every_path_fails(root, vid: str, error=MMPackError, skip: tuple[str, ...] = ()) -> None:
    for name, _, read in read_paths(root, vid):
        if name in skip:
            continue
        with pytest.raises(error):
            read()
            pytest.fail(f"{name} of {vid} read an exchanged or edited object without an error")
    report = Repository(root).verify(vid)
    assert not report.ok and report.problems[0].startswith(vid), str(report)


# -- class 2: an object's bytes are bound to the version that names it -------------------------


@pytest.mark.parametrize("pair", [("v1", "v2"), ("v3", "v4"), ("v5", "v6")], ids=["baselines", "updates", "compressed"])
def test_exchanged_objects_fail_every_read_path(copy, pair):
    root, _ = copy
    a, b = (read_manifest(root, vid)["objects"][0] for vid in pair)
    exchange(root, a, b)
    for vid in pair:
        # A delta's unchanged models come from its base: reading them never touches its object.
        skip = ("recover one", "recover two") if pair == ("v3", "v4") else ()
        assert_every_path_fails(root, vid, IntegrityError, skip=skip)
    if pair == ("v1", "v2"):  # versions built on an exchanged object fail too
        assert_every_path_fails(root, "v3", IntegrityError, skip=("hashes",))  # v3's own table is intact
    report = Repository(root).verify()
    assert {p.split(":")[0] for p in report.problems} >= set(pair), str(report)


def test_a_same_shaped_object_substituted_for_a_delta_is_detected(copy):
    """Substitution through a copy (a store serving another version's object under this key)."""
    root, _ = copy
    a, b = (read_manifest(root, vid)["objects"][0] for vid in ("v3", "v4"))
    shutil.copyfile(object_path(root, b), object_path(root, a))
    assert_every_path_fails(root, "v3", IntegrityError, skip=("recover one", "recover two"))
    assert Repository(root).recover("v4").equal(copy[1]["v4"])


def test_objects_named_by_two_manifests_are_reported(copy):
    root, sets = copy
    body = read_manifest(root, "v1")
    body["objects"] = read_manifest(root, "v2")["objects"]
    write_manifest(root, "v1", body)
    report = Repository(root).verify()
    assert any(p.startswith("v2: names object") for p in report.problems), str(report)


# -- class 3: every field a manifest states is checked against what it names -------------------


def edits(root, vid: str, sets):
    """(description, edit of the manifest body) pairs an attacker or a bad tool could make."""
    other = {v: read_manifest(root, v) for v in sets}
    huge = 2**32 - 1
    yield "fewer models", lambda b: b.update(n_models=N - 5)
    yield "more models", lambda b: b.update(n_models=N + 1)
    yield "7 TiB of models", lambda b: b.update(n_models=huge)
    yield "too many models", lambda b: b.update(n_models=2**40)
    yield "negative models", lambda b: b.update(n_models=-1)
    yield "float models", lambda b: b.update(n_models=float(N))
    yield "bool base", lambda b: b.update(base=True)
    for approach in ("baseline", "update", "provenance", "auto", "Baseline", 3):
        yield f"approach {approach}", lambda b, a=approach: b.update(approach=a)
    yield "update with a change list", lambda b: b.update(approach="update", base="v1", changes=other["v3"]["changes"])
    yield "baseline without changes", lambda b: b.update(approach="baseline", changes=None)
    yield "no objects", lambda b: b.update(objects=[])
    yield "two objects", lambda b: b.update(objects=b["objects"] * 2)
    yield "object of v2, key only", lambda b: b["objects"][0].update(key=other["v2"]["objects"][0]["key"])
    yield "object of another architecture", lambda b: b.update(objects=other["v8"]["objects"])
    yield "architecture of v8", lambda b: b.update(architecture=other["v8"]["architecture"])
    yield "unknown architecture", lambda b: b.update(architecture="0123456789abcdef")
    yield "object outside objects/", lambda b: b["objects"][0].update(key="versions/v1.json")
    yield "object key with ..", lambda b: b["objects"][0].update(key="objects/../repository.json")
    yield "object bytes", lambda b: b["objects"][0].update(bytes=b["objects"][0]["bytes"] + 1)
    yield "object pin", lambda b: b["objects"][0].update(pin="0" * 16)
    yield "no pin", lambda b: b["objects"][0].pop("pin", None) or b["objects"][0].pop("xxh3")
    yield (
        "base of another shape",
        lambda b: b.update(base="v8") if b["base"] else b.update(base="v8", approach="update"),
    )
    yield "missing base", lambda b: b.update(base="v99")
    yield "later base", lambda b: b.update(base="v9")
    yield "unknown key", lambda b: b.update(extra=1)
    yield "unknown detail", lambda b: b["details"].update(note="x")
    yield "xor base", lambda b: b["details"].update(xor_base="v2")
    yield "no xor base", lambda b: b["details"].pop("xor_base", None) or b["details"].update(xor_base="v1")
    if other[vid]["changes"] is not None:
        yield "more changed models", lambda b: b["changes"].update(count=b["changes"]["count"] + 1)
        yield "changes of v4", lambda b: b.update(changes=other["v4"]["changes"])
        yield "changes of v7", lambda b: b.update(changes=other["v7"]["changes"])
        yield "masks garbage", lambda b: b["changes"].update(masks="////")


@pytest.mark.parametrize("vid", ["v1", "v3", "v5", "v7"])
def test_every_edit_of_a_manifest_is_a_typed_error(copy, vid):
    root, sets = copy
    original = read_manifest(root, vid)
    for description, edit in edits(root, vid, sets):
        body = json.loads(json.dumps(original))
        edit(body)
        write_manifest(root, vid, body)
        for name, models, read in read_paths(root, vid):
            try:
                found = read()
            except MMPackError:
                continue
            assert returned_the_version(found, sets[vid], models), (
                f"{description}: {name} of {vid} returned other models than the version's")
        report = Repository(root).verify()  # never raises, whatever the edit
        assert isinstance(report.problems, list)
        assert not any("unexpected" in p for p in report.problems), f"{description}: {report}"
    write_manifest(root, vid, original)
    assert Repository(root).verify().ok


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
FIELDS = ["id", "approach", "base", "n_models", "architecture", "architecture_bytes",
          "created", "message", "reason", "objects", "changes", "details"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vid=st.sampled_from(["v1", "v3", "v7"]), field=st.sampled_from(FIELDS + ["objects.0.key", "objects.0.bytes",
       "changes.count", "changes.models"]), value=json_values)
def test_any_field_replaced_by_any_json_value_is_handled(history, tmp_path_factory, vid, field, value):
    root = tmp_path_factory.mktemp("fuzzed") / "repo"
    shutil.copytree(history[0], root)
    body = read_manifest(root, vid)
    target, *path = field.split(".")
    if path:
        holder = body[target]
        if holder is None:
            return
        holder = holder[0] if path[0] == "0" else holder
        holder[path[-1]] = value
    else:
        body[target] = value
    write_manifest(root, vid, body)
    for _, models, read in read_paths(root, vid):
        try:
            found = read()
        except MMPackError:
            continue
        assert returned_the_version(found, history[1][vid], models)
    report = Repository(root).verify()
    assert not any("unexpected" in p for p in report.problems), str(report)


def test_a_huge_model_count_fails_before_allocating(copy):
    """The 7 TiB case under a 2 GiB address-space limit: a typed error, not MemoryError."""
    import subprocess
    import sys

    root, _ = copy
    body = read_manifest(root, "v1")
    body["n_models"] = 2**32 - 1
    write_manifest(root, "v1", body)
    script = (
        "import resource, sys, mmpack\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        f"repo = mmpack.Repository({str(root)!r})\n"
        "for read in (lambda: repo.recover('v1'), lambda: repo.recover('v1', [0]), lambda: repo.hashes('v1')):\n"
        "    try:\n        read()\n    except mmpack.MMPackError as exc:\n        print('typed', type(exc).__name__)\n"
        "print(repo.verify().problems[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=str(root.parent)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("typed") == 3, done.stdout
    assert any(word in done.stdout for word in ("4294967295", "models", "shape")), done.stdout


def test_a_delta_on_a_set_of_another_shape_is_refused(tmp_path):
    repo = Repository(tmp_path / "repo", fsync=False)
    repo.save(mixed_models(N))
    first = ModelSet.from_modules(ffnn_models(N))
    repo.save(first)
    repo.save(retrain(first, [1], []), approach="update", base="v2")
    repo.save(ModelSet.from_modules(ffnn_models(N + 1)))
    for base in ("v1", "v4"):
        body = read_manifest(repo.store.root, "v3")
        body["base"] = base
        write_manifest(repo.store.root, "v3", body)
        with pytest.raises(MMPackError, match="another shape|not an earlier"):
            Repository(repo.store.root).recover("v3")


# -- class 9: a recovery sees what verify sees in rows-layout objects --------------------------


def _update_object(root, vid: str):
    """(path, header) of a version's data object."""
    from mmpack import fileformat
    from mmpack._io import FileReader

    path = object_path(root, read_manifest(root, vid)["objects"][0])
    with open(path, "rb") as f, FileReader(f) as source:
        return path, fileformat.read_header(source)


def _poke(path: str, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]))


@pytest.mark.parametrize("where", ["padding after a tensor", "row index", "padding before the table"])
def test_a_recovery_rejects_damage_only_verify_used_to_see(copy, where):
    root, sets = copy
    path, header = _update_object(root, "v3")
    layout = header.layout
    if where == "padding after a tensor":
        sections = layout.sections()
        offset = header.data_start + next(o + n for (o, n), (after, _) in zip(sections, sections[1:]) if o + n < after)
    elif where == "row index":
        offset = header.data_start + layout.row_index_offset
    else:
        offset = header.data_start + layout.row_index_offset + layout.row_index_length
        assert offset < header.data_start + layout.hashes_offset
    _poke(path, offset, 3)
    with pytest.raises(MMPackError):
        Repository(root).recover("v3")
    assert not Repository(root).verify("v3").ok


def test_a_corrupted_row_index_is_caught_without_a_pin(tmp_path):
    """Manifests of format 1 pin nothing: the row index is then checked against the change list."""
    from golden_sets import GOLDEN_DIR

    root = tmp_path / "repo"
    shutil.copytree(GOLDEN_DIR / "repo_format1", root)
    path, header = _update_object(root, "v2")
    offset = header.data_start + header.layout.row_index_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        first = int.from_bytes(f.read(4), "little")
        f.seek(offset)
        f.write((first + 1).to_bytes(4, "little"))  # still ascending: only the manifest can tell
    with pytest.raises(MMPackError, match="other rows"):
        Repository(root).recover("v2")
