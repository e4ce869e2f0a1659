"""The mmpack command, driven through real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmpack
from mmpack import ModelIndexError, Repository
from mmpack.cli import UsageError, parse_models
from mmpack.workloads.battery import BatteryFleet, TrainingConfig


def mmpack_cli(*args: str) -> subprocess.CompletedProcess:
    # Run outside the checkout: `python -m` puts the working directory first on sys.path,
    # and the source tree has no compiled extension.
    return subprocess.run([sys.executable, "-m", "mmpack", *args], capture_output=True, text=True, timeout=600,
                          cwd=tempfile.gettempdir())


@pytest.fixture(scope="module")
def repo_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    fleet = BatteryFleet(16, root / "data", initial_steps=3, config=TrainingConfig(steps=3))
    ms, _ = fleet.initial_models()
    repo = Repository(root / "repo", fsync=False)
    v1 = repo.save(ms, message="initial pack")
    ms2, prov = fleet.update_cycle(ms, 1, fraction=0.25)
    v2 = repo.save(ms2, approach="update", base=v1, message="cycle 1")
    ms3, prov3 = fleet.update_cycle(ms2, 2, fraction=0.25)
    repo.save(ms3, approach="provenance", base=v2, provenance=prov3, message="cycle 2")
    return str(root / "repo"), [ms, ms2, ms3]


def test_parse_models():
    assert parse_models("3,17,40-42", 50) == [3, 17, 40, 41, 42]
    assert parse_models("5", 6) == [5]
    for bad in ("3,x", "4-2", "", "-3", "1,,2", "2-", "٣", "1,1", "0-3,2", "0-99,5"):
        with pytest.raises(UsageError):
            parse_models(bad, 100)
    for beyond in ("16", "0-16", "3,12345678901234567890123", "0-999999999", "0-" + "9" * 4000):
        with pytest.raises(ModelIndexError, match="the version has 16 models"):
            parse_models(beyond, 16)


@given(st.lists(st.tuples(st.integers(0, 2**70), st.integers(0, 40), st.booleans()), min_size=1, max_size=12),
       st.integers(1, 60))
def test_parse_models_checks_before_expanding(parts, n_models):
    # Whatever the spec, the result is the reference expansion (unique, in range, never more than
    # n_models long) or a typed error; nothing is expanded beyond the set.
    spec = ",".join(f"{low}-{low + width}" if ranged else str(low) for low, width, ranged in parts)
    expected = [m for low, width, ranged in parts for m in (range(low, low + width + 1) if ranged else [low])]
    try:
        got = parse_models(spec, n_models)
    except ModelIndexError:
        assert max(expected) >= n_models
        return
    except UsageError:
        assert max(expected) < n_models and len(set(expected)) < len(expected)
        return
    assert got == expected and len(got) <= n_models and len(set(got)) == len(got)


def test_log_show_du(repo_path):
    path, _ = repo_path
    log = mmpack_cli("log", path)
    assert log.returncode == 0, log.stderr
    assert "v1" in log.stdout and "provenance" in log.stdout and "cycle 1" in log.stdout
    show = mmpack_cli("show", path, "v2")
    assert show.returncode == 0 and "update" in show.stdout and "chain depth 1" in show.stdout
    assert "fc2.weight" in show.stdout and "hashes" in show.stdout
    du = mmpack_cli("du", path)
    assert du.returncode == 0 and "full snapshots" in du.stdout and "provenance" in du.stdout


def test_verify_passes_then_fails_on_damage(repo_path, tmp_path):
    path, _ = repo_path
    ok = mmpack_cli("verify", path)
    assert ok.returncode == 0 and "all good" in ok.stdout and "not retrained" in ok.stdout
    assert mmpack_cli("verify", path, "--allow-import").returncode == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    record = Repository(damaged).version("v1")
    target = damaged.joinpath(*record.objects[0].key.split("/"))
    data = bytearray(target.read_bytes())
    data[5000] ^= 1
    target.write_bytes(bytes(data))
    bad = mmpack_cli("verify", str(damaged))
    assert bad.returncode == 1 and "v1" in bad.stdout


@pytest.mark.parametrize("fmt", ["mmpack", "torch", "safetensors"])
def test_recover_exports_selected_models(repo_path, tmp_path, fmt):
    path, sets = repo_path
    out = tmp_path / f"out-{fmt}"
    result = mmpack_cli(
        "recover", path, "v3", "--models", "1,3-4", "--out", str(out), "--format", fmt, "--allow-import"
    )
    assert result.returncode == 0, result.stderr
    expected = sets[2].select([1, 3, 4])
    if fmt == "mmpack":
        assert mmpack.load(out).equal(expected)
        return
    for row, model in enumerate([1, 3, 4]):
        if fmt == "torch":
            state = torch.load(out / f"model-{model}.pt", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(out / f"model-{model}.safetensors")
        for name in expected.architecture.names:
            assert torch.equal(state[name], expected.tensors[name][row])
        assert state["fc2.weight"].untyped_storage().nbytes() == expected.tensors["fc2.weight"][row].nbytes


def test_gc(repo_path):
    result = mmpack_cli("gc", repo_path[0], "--grace", "0")
    assert result.returncode == 0 and "removed 0 temporary files" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["log", "/no/such/repository"], 1, "no mmpack repository"),
        (["show", "{repo}", "v42"], 1, "no version 'v42'"),
        (["show", "{repo}", "../etc"], 1, "version ids look like"),
        (["recover", "{repo}", "v1", "--out", "x", "--models", "1,zz"], 2, "malformed --models"),
        (["recover", "{repo}", "v1"], 2, "--out"),
        (["recover", "{repo}", "v3", "--out", "{tmp}/p.mmpack"], 1, "allow_import"),
        (["frobnicate"], 2, "invalid choice"),
        (["recover", "{repo}", "v1", "--out", "{tmp}/q", "--format", "onnx"], 2, "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_and_an_exit_code(repo_path, tmp_path, args, code, message):
    args = [a.format(repo=repo_path[0], tmp=tmp_path) for a in args]
    result = mmpack_cli(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = mmpack_cli("--debug", "log", "/no/such/repository")
    assert result.returncode == 1 and "Traceback" in result.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGPIPE"), reason="no SIGPIPE on this platform")
def test_main_leaves_the_callers_signal_handlers_alone(repo_path, capsys):
    # A SIGPIPE reset to its default would outlive main() and kill the caller, without a word,
    # at its next write to a socket that the peer closed (as it did to this test suite).
    from mmpack.cli import main

    before = signal.getsignal(signal.SIGPIPE)
    assert main(["log", repo_path[0]]) == 0
    assert "initial pack" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGPIPE) == before


def test_a_reader_that_goes_away_ends_the_command_quietly(repo_path):
    # `mmpack log REPO | head -1`: the reader is gone before the command writes (it is still importing torch).
    proc = subprocess.Popen([sys.executable, "-m", "mmpack", "log", repo_path[0]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    proc.stdout.close()
    stderr = proc.communicate(timeout=600)[1]
    assert (proc.returncode, stderr) == (0, b"")


def test_every_subcommand_has_help(capsys):
    from mmpack.cli import main

    for command in ("log", "show", "du", "verify", "recover", "gc", "demo", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: mmpack {command}" in capsys.readouterr().out


def test_demo_runs_end_to_end_and_verifies(tmp_path):
    result = mmpack_cli("demo", "--models", "40", "--cycles", "2", "--dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all recovered models verified bit-exact: True" in result.stdout
    for name in ("baseline", "update", "provenance", "one file per model"):
        assert name in result.stdout
    refused = mmpack_cli("demo", "--models", "40", "--dir", str(tmp_path / "demo"))
    assert refused.returncode == 1 and "not empty" in refused.stderr


def test_the_fleet_demo_saves_updates_and_recovers_a_set_in_slices(tmp_path):
    result = mmpack_cli("demo", "--fleet", "--models", "3000", "--slice", "700", "--dir", str(tmp_path / "fleet"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verified bit-exact against the models made: True" in result.stdout
    assert "save an update of 30 models" in result.stdout
    log = mmpack_cli("log", str(tmp_path / "fleet" / "fleet"))
    assert log.returncode == 0 and "1 % retrained" in log.stdout


def test_bench_paper_runs_small(tmp_path):
    result = mmpack_cli(
        "bench", "paper", "--models", "60", "--cycles", "2", "--runs", "1", "--json", str(tmp_path / "r.json")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "targets:" in result.stdout and "(issue 3)" in result.stdout
    assert os.path.getsize(tmp_path / "r.json") > 100
    summary = subprocess.run([sys.executable, "-m", "mmpack.evaluation.summary", str(tmp_path / "r.json")],
                             capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert summary.returncode == 0, summary.stderr
    assert "Time to recover over update cycles (Figure 5)" in summary.stdout and "| update |" in summary.stdout
    from mmpack.evaluation.summary import BEGIN, END

    doc = tmp_path / "EVALUATION.md"
    doc.write_text(f"# prose stays\n{BEGIN}\nold figures\n{END}\nmore prose\n")
    subprocess.run([sys.executable, "-m", "mmpack.evaluation.summary", str(tmp_path / "r.json"), "--into", str(doc)],
                   check=True, cwd=tempfile.gettempdir())
    text = doc.read_text()
    assert text.startswith("# prose stays\n") and text.endswith(f"{END}\nmore prose\n") and "old figures" not in text
    assert summary.stdout.strip() in text
    pytest.importorskip("matplotlib")
    from mmpack.evaluation.plots import plot_all

    with open(tmp_path / "r.json") as f:
        paths = plot_all(json.load(f), str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [
        "fig3_storage.png",
        "fig4_time_to_save.png",
        "fig5_time_to_recover.png",
    ]
    assert all(os.path.getsize(p) > 10_000 for p in paths)


def test_every_repository_command_works_on_object_storage(s3_server, repo_path, tmp_path):
    # The same versions as the local fixture, copied to the loopback S3 server version by version.
    _, sets = repo_path
    url = s3_server.url("cli")
    remote = Repository(url, storage_options=s3_server.storage_options)
    v1 = remote.save(sets[0], message="initial pack")
    v2 = remote.save(sets[1], approach="update", base=v1, message="cycle 1")
    options = ("--storage-options", json.dumps(s3_server.storage_options))
    log = mmpack_cli("log", url, *options)
    assert log.returncode == 0 and "initial pack" in log.stdout and "cycle 1" in log.stdout, log.stderr
    assert "chain depth 1" in mmpack_cli("show", url, v2, *options).stdout
    assert "full snapshots" in mmpack_cli("du", url, *options).stdout
    verify = mmpack_cli("verify", url, *options)
    assert verify.returncode == 0 and "all good" in verify.stdout, verify.stdout + verify.stderr
    out = tmp_path / "two.mmpack"
    exported = mmpack_cli("recover", url, v2, "--models", "1,3", "--out", str(out), *options)
    assert exported.returncode == 0, exported.stderr
    assert mmpack.load(out).equal(sets[1].select([1, 3]))
    assert mmpack_cli("gc", url, *options).returncode == 0
    from_environment = subprocess.run([sys.executable, "-m", "mmpack", "log", url], capture_output=True, text=True,
                                      timeout=600, cwd=tempfile.gettempdir(),
                                      env={**os.environ, "MMPACK_STORAGE_OPTIONS": options[1]})
    assert from_environment.returncode == 0 and "cycle 1" in from_environment.stdout, from_environment.stderr


def test_bad_storage_options_are_usage_errors(repo_path):
    path, _ = repo_path
    for bad in ("{not json", "[1, 2]"):
        result = mmpack_cli("log", "s3://bucket/prefix", "--storage-options", bad)
        assert result.returncode == 2 and "--storage-options" in result.stderr and "Traceback" not in result.stderr
    local = mmpack_cli("log", path, "--storage-options", "{}")
    assert local.returncode == 0  # an empty object is no options
    refused = mmpack_cli("log", path, "--storage-options", '{"anon": true}')
    assert refused.returncode == 1 and "storage_options apply to fsspec URLs" in refused.stderr


# -- bad input: one line, a non-zero exit, nothing written (issue 11, class 8) ---------------------


def _tree(root) -> dict:
    """Every path under ``root`` with its type, size and modification time: what "nothing written" compares."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            found[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


def _limited_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a range expanded before its check dies here


_NO_AWS = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}

# The command-line failures issue 11 lists, each run as a real process.
LISTED_FAILURES = [
    (["demo", "--cycles", "-1", "--models", "3", "--dir", "{tmp}/demo"], 2, "argument --cycles: must be at least 0"),
    (["log", "s3://"], 1, "'s3://' names no bucket"),
    (["log", "s3://bucket/x", "--storage-options", '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}'], 1,
     "cannot read catalog/HEAD.json in FsspecStore('s3://bucket/x'): Unable to locate credentials"),
    (["gc", "{tmp}/repo", "--grace", "nan"], 2, "argument --grace: must be a finite number"),
    (["log", "memory://x"], 1, "no mmpack repository at FsspecStore('memory://x')"),
    (["recover", "{tmp}/repo", "v1", "--models", "12345678901234567890123", "--out", "{tmp}/o.mmpack"], 1,
     "--models names model 12345678901234567890123: the version has 16 models"),
    (["recover", "{tmp}/repo", "v1", "--out", "{tmp}/existing.mmpack"], 1, "exists; pass --force to replace it"),
    (["recover", "{tmp}/repo", "v1", "--models", "0-999999999", "--out", "{tmp}/o.mmpack"], 1,
     "--models names model 999999999"),
]


def test_listed_command_line_failures_are_one_line_and_write_nothing(repo_path, tmp_path):
    shutil.copytree(repo_path[0], tmp_path / "repo")
    (tmp_path / "repo" / "objects" / "0123456789abcdef0123.mmpack").write_bytes(b"a save in progress elsewhere")
    (tmp_path / "existing.mmpack").write_bytes(b"keep me")
    before = _tree(tmp_path)

    def run(case):
        args = [a.replace("{tmp}", str(tmp_path)) for a in case[0]]
        return subprocess.run([sys.executable, "-m", "mmpack", *args], capture_output=True, text=True, timeout=600,
                              cwd=tempfile.gettempdir(), env=_NO_AWS, preexec_fn=_limited_memory)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, LISTED_FAILURES))
    for (args, code, message), result in zip(LISTED_FAILURES, results):
        assert result.returncode == code, (args, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        assert len(result.stderr.splitlines()) == 1 and result.stdout == "", (args, result.stderr)
    assert _tree(tmp_path) == before


def _main(capsys, *args: str) -> tuple[int, str]:
    """``mmpack.cli.main`` in this process (safe: it leaves signal handlers alone); (status, stderr)."""
    from mmpack.cli import main

    try:
        status = main(list(args))
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err
    assert len(err.splitlines()) <= 1 and "Traceback" not in err, err
    return status, err


_NUMBERS = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-inf", "1e3", "1_000", "0x10", " 7", "", "٣", "9" * 5000, "-0", "0.0"]),
    st.text(max_size=8),
)


@given(st.sampled_from([("demo", "--models", 1), ("demo", "--cycles", 0), ("gc", "--grace", 0.0),
                        ("paper", "--models", 1), ("paper", "--cycles", 1), ("paper", "--runs", 1),
                        ("paper", "--rate", None)]), _NUMBERS)
def test_numeric_options_are_checked_when_parsed(option, value):
    # Every numeric option of every subcommand: a usage error (status 2, one line) or a valid value.
    import contextlib
    import io

    from mmpack.cli import build_parser
    from mmpack.evaluation import paper

    command, flag, least = option
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            if command == "paper":
                parsed = paper.parse_args([flag, value])
            else:
                parsed = build_parser().parse_args([command, *(["repo"] if command == "gc" else []), flag, value])
        except SystemExit as exit_info:
            assert exit_info.code == 2
            assert len(stderr.getvalue().splitlines()) == 1 and "error: " in stderr.getvalue()
            return
    got = getattr(parsed, flag[2:])
    if least is None:
        assert 0 < got <= 1
    else:
        assert type(got) is type(least) and got >= least and got == got and abs(got) != float("inf")


@pytest.mark.parametrize("command", [["log"], ["show", "v1"], ["du"], ["verify"], ["gc", "--grace", "0"],
                                     ["recover", "v1", "--out", "{tmp}/o.mmpack"]])
def test_repository_commands_never_create_a_repository(capsys, tmp_path, command):
    import fsspec

    memory = fsspec.filesystem("memory")
    for location in (str(tmp_path / "none"), f"file://{tmp_path}/none2", f"memory://fresh-{os.getpid()}/r"):
        keys = set(memory.store) | set(memory.pseudo_dirs)
        args = [command[0], location, *(a.format(tmp=tmp_path) for a in command[1:])]
        status, err = _main(capsys, *args)
        assert status == 1 and "no mmpack repository at" in err, err
        assert set(memory.store) | set(memory.pseudo_dirs) == keys
        assert os.listdir(tmp_path) == []
    with pytest.raises(mmpack.RepositoryNotFoundError, match="no mmpack repository"):
        Repository(tmp_path / "none", create=False)
    assert not os.path.exists(tmp_path / "none")


def test_recover_replaces_an_output_only_with_force(repo_path, tmp_path, capsys):
    path, sets = repo_path
    out = tmp_path / "one.mmpack"
    out.write_bytes(b"keep me")
    assert _main(capsys, "recover", path, "v2", "--models", "3", "--out", str(out))[0] == 1
    assert out.read_bytes() == b"keep me"
    assert _main(capsys, "recover", path, "v2", "--models", "3", "--out", str(out), "--force")[0] == 0
    assert mmpack.load(out).equal(sets[1].select([3]))
    assert _main(capsys, "recover", path, "v2", "--out", str(tmp_path), "--format", "mmpack")[0] == 1  # a directory
    for fmt, suffix in (("torch", "pt"), ("safetensors", "safetensors")):
        directory = tmp_path / fmt
        directory.mkdir()  # an empty directory holds nothing to replace
        assert _main(capsys, "recover", path, "v2", "--models", "1", "--out", str(directory), "--format", fmt)[0] == 0
        assert sorted(os.listdir(directory)) == [f"model-1.{suffix}"]
        status, err = _main(capsys, "recover", path, "v2", "--models", "1-2", "--out", str(directory), "--format", fmt)
        assert status == 1 and "pass --force" in err and sorted(os.listdir(directory)) == [f"model-1.{suffix}"]
        assert _main(capsys, "recover", path, "v2", "--models", "1-2", "--out", str(directory), "--format", fmt,
                     "--force")[0] == 0
        assert sorted(os.listdir(directory)) == [f"model-1.{suffix}", f"model-2.{suffix}"]
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no staging left behind


def test_a_failed_export_leaves_no_output(repo_path, tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    status, err = _main(capsys, "recover", repo_path[0], "v2", "--out", str(tmp_path / "t"), "--format", "torch")
    assert status == 1 and "No space left on device" in err
    assert os.listdir(tmp_path) == []


def test_unexpected_errors_are_one_line_too(repo_path, capsys, monkeypatch):
    class ClientFailure(Exception):
        pass

    def broken(self, vid):
        raise ClientFailure("line one\nline two")

    monkeypatch.setattr(Repository, "version", broken)
    status, err = _main(capsys, "show", repo_path[0], "v1")
    assert status == 1 and "unexpected ClientFailure" in err and "line one; line two" in err and "--debug" in err


def test_repository_commands_never_create_a_repository_on_object_storage(s3_server, capsys, tmp_path):
    from mmpack.store import FsspecStore

    url = s3_server.url("never")
    options = json.dumps(s3_server.storage_options)
    bucket = FsspecStore(f"s3://{s3_server.bucket}", s3_server.storage_options)
    before = bucket.fs.find(f"{s3_server.bucket}/", withdirs=True)
    for command in (
        ["log"],
        ["show", "v1"],
        ["du"],
        ["verify"],
        ["gc"],
        ["recover", "v1", "--out", str(tmp_path / "o")],
    ):
        status, err = _main(capsys, command[0], url, *command[1:], "--storage-options", options)
        assert status == 1 and f"no mmpack repository at FsspecStore({url!r})" in err, err
    bucket.fs.invalidate_cache()
    assert bucket.fs.find(f"{s3_server.bucket}/", withdirs=True) == before and os.listdir(tmp_path) == []


def test_tags_history_diffs_prune_and_upgrade_on_the_command_line(tmp_path, capsys):
    from golden_sets import GOLDEN_DIR

    from mmpack.cli import main

    def mmpack_cli(*args: str) -> subprocess.CompletedProcess:  # in-process: twenty commands
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
        found = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, found.out, found.err)

    root = tmp_path / "repo"
    shutil.copytree(GOLDEN_DIR / "repo_format1", root)
    refused = mmpack_cli("tag", str(root), "production", "v2")
    assert refused.returncode == 1 and "upgrade" in refused.stderr
    assert "upgraded" in mmpack_cli("upgrade", str(root)).stdout
    assert "format 2 already" in mmpack_cli("upgrade", str(root)).stdout
    assert mmpack_cli("tag", str(root), "production", "v2", "--message", "first").returncode == 0
    moved = mmpack_cli("tag", str(root), "production", "v3", "--expected", "v1")
    assert moved.returncode == 1 and "not on v1" in moved.stderr
    assert mmpack_cli("tag", str(root), "production", "v3", "--expected", "v2").stdout.strip() == "production: v2 -> v3"
    log = mmpack_cli("log", str(root)).stdout
    assert "production" in next(line for line in log.splitlines() if line.startswith("v3"))
    moves = mmpack_cli("log", str(root), "--tags").stdout.splitlines()[2:]
    assert [line.split()[2:5] for line in moves] == [["production", "-", "v2"], ["production", "v2", "v3"]]
    history = mmpack_cli("log", str(root), "--model", "4").stdout.splitlines()[2:]
    assert [line.split()[0] for line in history] == ["v1", "v2", "v3", "v5"]
    diff = mmpack_cli("diff", str(root), "v1", "production")
    assert diff.returncode == 0 and diff.stdout.startswith("5 models")
    before = sorted(os.listdir(root / "objects"))
    dry = mmpack_cli("prune", str(root), "--keep-last", "1", "--dry-run")
    assert "would delete: v1, v2, v4" in dry.stdout and sorted(os.listdir(root / "objects")) == before
    assert mmpack_cli("prune", str(root)).returncode == 2  # nothing named to keep: refused
    done = mmpack_cli("prune", str(root), "--keep-last", "1", "--allow-import")
    assert done.returncode == 0 and "deleted: v1, v2, v4" in done.stdout, done.stderr
    assert mmpack_cli("gc", str(root), "--grace", "0").returncode == 0
    assert [line.split()[0] for line in mmpack_cli("log", str(root)).stdout.splitlines()[2:]] == ["v3", "v5"]
    verify = mmpack_cli("verify", str(root))
    assert verify.returncode == 0, verify.stdout + verify.stderr
