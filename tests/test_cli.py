"""The mmpack command, driven through real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

import mmpack
from mmpack import Repository
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
    assert parse_models("3,17,40-42") == [3, 17, 40, 41, 42]
    assert parse_models("5") == [5]
    for bad in ("3,x", "4-2", "", "-3", "1,,2", "2-"):
        with pytest.raises(UsageError):
            parse_models(bad)


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
    result = mmpack_cli("recover", path, "v3", "--models", "1,3-4", "--out", str(out), "--format", fmt, "--allow-import")
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


def test_bench_paper_runs_small(tmp_path):
    result = mmpack_cli("bench", "paper", "--models", "60", "--cycles", "2", "--runs", "1", "--json", str(tmp_path / "r.json"))
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
    assert [os.path.basename(p) for p in paths] == ["fig3_storage.png", "fig4_time_to_save.png", "fig5_time_to_recover.png"]
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
