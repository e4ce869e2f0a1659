"""The ``mmpack`` command: inspect, verify, export and maintain repositories; run the demo and benchmarks.

Exit codes: 0 success, 1 failure (a damaged repository, an unknown version,
a failed verification, a store that cannot be reached), 2 usage errors.
Errors are one line on stderr; pass ``--debug`` for the traceback. A command
that fails writes nothing: repository commands never create a repository,
and ``recover`` refuses to replace an existing output unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence

import torch

from mmpack import _io
from mmpack._options import Parser, moment, non_negative_int, one_line, positive_int, seconds
from mmpack._progress import progress
from mmpack.errors import MMPackError, ModelIndexError
from mmpack.records import VersionRecord
from mmpack.repository import Repository

EXPORT_FORMATS = ("mmpack", "torch", "safetensors")


class UsageError(Exception):
    """Bad command-line input: exit status 2."""


def parse_models(spec: str, n_models: int) -> list[int]:
    """``"3,17,40-45"`` -> ``[3, 17, 40, 41, 42, 43, 44, 45]`` (order kept, ranges inclusive).

    Every index and range is checked against ``n_models`` before anything is
    expanded, and a model may be named once: the result never holds more
    than ``n_models`` indices, whatever the spec says (``0-999999999`` is a
    clear error, not a billion-element list). Malformed specs raise
    :class:`UsageError`, indices outside the set :class:`~mmpack.ModelIndexError`.
    """
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        try:
            low = _index(first)
            high = _index(last) if dash else low
        except ValueError:
            raise UsageError(f"malformed --models {spec!r}: {part!r} is not an index or a range like 40-45") from None
        if high < low:
            raise UsageError(f"malformed --models {spec!r}: range {part!r} runs backwards")
        if high >= n_models:
            raise ModelIndexError(f"--models names model {high}: the version has {n_models} models (0..{n_models - 1})")
        ranges.append((low, high))
    if sum(high - low + 1 for low, high in ranges) > n_models:
        raise UsageError(f"--models {spec!r} names some model more than once")
    models = [m for low, high in ranges for m in range(low, high + 1)]
    if len(set(models)) != len(models):
        raise UsageError(f"--models {spec!r} names some model more than once")
    return models


def _index(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


def _open(args: argparse.Namespace) -> Repository:
    """The repository the command names; never created (RepositoryNotFoundError if there is none)."""
    path = args.repo
    text = args.storage_options
    if text is None and "://" in path:
        text = os.environ.get("MMPACK_STORAGE_OPTIONS")
    return Repository(path, storage_options=_storage_options(text), create=False)


def _storage_options(text: str | None) -> dict | None:
    """``--storage-options`` (or, for URLs, $MMPACK_STORAGE_OPTIONS): a JSON object for the URL's file system."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise UsageError('--storage-options must be a JSON object, e.g. \'{"profile": "prod"}\'')
    return options


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _table(headers: list[str], rows: list[list[str]]) -> None:
    from mmpack.evaluation.timing import print_table

    print_table(headers, rows)


# -- commands -------------------------------------------------------------------


def cmd_log(args: argparse.Namespace) -> int:
    repo = _open(args)
    if args.tags:
        moves = repo.tag_log()
        _table(
            ["time (UTC)", "tag", "from", "to", "message"],
            [[m.time.strftime("%Y-%m-%d %H:%M:%S"), m.name, m.before or "-", m.after or "-", m.message] for m in moves],
        )
        return 0
    if args.model is not None:
        changes = repo.history(args.model)
        _table(["id", "created (UTC)", "approach", "tensors changed", "message"],
               [[c.version, c.created.strftime("%Y-%m-%d %H:%M:%S"), c.approach, ", ".join(c.tensors), c.message]
                for c in changes])
        return 0
    tags: dict[str, list[str]] = defaultdict(list)
    for name, vid in (repo.tags().items() if repo.format_version >= 2 else ()):
        tags[vid].append(name)
    rows = [
        [r.id, r.approach, r.base or "-", str(r.n_models), _bytes(r.stored_bytes),
         r.created.strftime("%Y-%m-%d %H:%M:%S"), ", ".join(sorted(tags.get(r.id, []))) or "-", r.message]
        for r in repo.versions()
    ]
    _table(["id", "approach", "base", "models", "stored", "created (UTC)", "tags", "message"], rows)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    repo = _open(args)
    diff = repo.diff(args.a, args.b)
    print(f"{len(diff)} models, {diff.pairs} (model, tensor) pairs differ between {args.a} and {args.b}")
    if len(diff):
        _table(["model", "tensors"], [[str(m), ", ".join(t)] for m, t in zip(diff.models.tolist(), diff.tensors)])
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    repo = _open(args)
    if args.delete:
        if args.vid is not None:
            raise UsageError("tag --delete NAME takes no version")
        move = repo.untag(args.name, expected=args.expected, message=args.message)
    else:
        if args.vid is None:
            raise UsageError("tag NAME VERSION: give the version (or --delete)")
        move = repo.tag(args.name, args.vid, expected=args.expected, message=args.message)
    print(f"{move.name}: {move.before or '-'} -> {move.after or '-'}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.newer_than is None and not args.keep:
        raise UsageError("prune needs what to keep: --keep-last N, --newer-than TIME or --keep VERSION")
    repo = _open(args)
    report = repo.prune(keep_last=args.keep_last, newer_than=args.newer_than, keep_tagged=not args.untagged,
                        keep=args.keep, dry_run=args.dry_run, message=args.message, allow_import=args.allow_import)
    print(report)
    if report.deleted:
        print(("would delete: " if report.dry_run else "deleted: ") + ", ".join(report.deleted))
    if report.rewritten:
        print(("would rewrite: " if report.dry_run else "rewrote: ") + ", ".join(report.rewritten))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    repo = _open(args)
    if repo.upgrade():
        print(f"upgraded {args.repo} to repository format 2 ({len(repo.versions())} versions)")
    else:
        print(f"{args.repo} is repository format {repo.format_version} already")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    repo = _open(args)
    record = repo.version(args.vid)
    arch = repo.architecture(record.architecture)
    chain = repo.chain(record.id)
    print(f"version      {record.id}")
    print(f"approach     {record.approach} ({record.reason})")
    print(f"base         {record.base or '-'}   chain depth {len(chain) - 1} (to full version {chain[-1].id})")
    print(f"models       {record.n_models}, {len(arch)} tensors, {_bytes(arch.nbytes_per_model)} per model")
    print(f"created      {record.created.isoformat()}")
    print(f"message      {record.message}")
    if record.changes is not None:
        print(f"changed      {len(record.changes.models)} models, {record.changes.n_pairs} (model, tensor) pairs")
    for key, value in record.details.items():
        print(f"{key:<12} {value}")
    if len(record.shards) > 1 or record.table_shards:
        ranges = ", ".join(f"{s.first}-{s.stop - 1}" for s in record.shards[:4])
        print(f"shards       {len(record.shards)} of models {ranges}{', ...' if len(record.shards) > 4 else ''}; "
              f"{len(record.table_shards)} table objects")
    print(
        f"stored       {_bytes(record.stored_bytes)}: "
        + ", ".join(f"{kind} {_bytes(n)}" for kind, n in _kinds(repo, record).items())
    )
    print(f"class        {arch.module or '-'}")
    _table(
        ["tensor", "kind", "dtype", "shape"],
        [[t.name, t.kind, str(t.dtype).removeprefix("torch."), str(t.shape)] for t in arch.tensors],
    )
    return 0


def _kinds(repo: Repository, record: VersionRecord) -> dict[str, int]:
    """Bytes a version added, by kind: tensor data, hashes, provenance, manifest, architecture."""
    kinds: dict[str, int] = defaultdict(int)
    for ref in record.objects:
        if record.approach == "provenance":
            kinds["provenance"] += ref.bytes
            continue
        header = repo.objects.header(ref)
        kinds["hashes"] += header.layout.hashes_length
        kinds["data"] += ref.bytes - header.layout.hashes_length
    kinds["manifest"] += record.manifest_bytes
    if record.architecture_bytes:
        kinds["architecture"] += record.architecture_bytes
    return dict(kinds)


def cmd_du(args: argparse.Namespace) -> int:
    repo = _open(args)
    records = repo.versions()
    by_approach: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_kind: dict[str, int] = defaultdict(int)
    full_bytes = 0
    for record in records:
        by_approach[record.approach][0] += 1
        by_approach[record.approach][1] += record.stored_bytes
        for kind, n in _kinds(repo, record).items():
            by_kind[kind] += n
        if record.is_full:
            full_bytes = sum(ref.bytes for ref in record.objects)
    total = sum(v[1] for v in by_approach.values())
    _table(["approach", "versions", "stored"], [[a, str(v[0]), _bytes(v[1])] for a, v in sorted(by_approach.items())])
    print()
    _table(["kind", "stored", "share"], [[k, _bytes(n), f"{n / total:.1%}"] for k, n in sorted(by_kind.items())])
    if full_bytes and records:
        snapshots = full_bytes * len(records)
        print(f"\ntotal {_bytes(total)} for {len(records)} versions; full snapshots of each would take "
              f"{_bytes(snapshots)} ({snapshots / total:.1f}x)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    repo = _open(args)
    report = repo.verify(args.vid, allow_import=args.allow_import)
    print(report)
    return 0 if report.ok else 1


def cmd_recover(args: argparse.Namespace) -> int:
    _check_output(args.out, args.format, args.force)  # before the work, and before anything is written
    repo = _open(args)
    record = repo.version(args.vid)
    indices = parse_models(args.models, record.n_models) if args.models is not None else None
    ms = repo.recover(record.id, indices=indices, allow_import=args.allow_import)
    chosen = indices if indices is not None else list(range(len(ms)))
    if args.format == "mmpack":
        from mmpack.fileformat import save

        metadata = {"repository": str(args.repo), "version": args.vid}
        _publish_file(args.out, args.force, lambda path: save(ms, path, metadata=metadata))
        print(f"wrote {len(ms)} models of {args.vid} to {args.out}")
        return 0
    if args.format == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise MMPackError("--format safetensors needs the safetensors package: pip install safetensors") from None

    def write_all(directory: str) -> None:
        for row, model in progress(list(enumerate(chosen)), f"writing {args.format} files"):
            state = {name: t[row].clone() for name, t in ms.tensors.items()}  # clone: not the whole stacked storage
            if args.format == "torch":
                torch.save(state, os.path.join(directory, f"model-{model}.pt"))
            else:
                save_file(state, os.path.join(directory, f"model-{model}.safetensors"))

    _publish_directory(args.out, args.force, write_all)
    print(f"wrote {len(chosen)} {args.format} files of {args.vid} to {args.out}")
    return 0


def _check_output(out: str, fmt: str, force: bool) -> None:
    """Refuse an output that exists (a file, or a directory with files) unless ``force``, and one
    whose directory does not exist."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise MMPackError(f"--out {out!r}: the directory {parent!r} does not exist")
    if fmt == "mmpack" and os.path.isdir(out):
        raise MMPackError(f"--out {out!r} is a directory; --format mmpack writes one file")
    if fmt != "mmpack" and os.path.lexists(out) and not os.path.isdir(out):
        raise MMPackError(f"--out {out!r} is a file; --format {fmt} writes a directory of files")
    occupied = os.path.isdir(out) and bool(os.listdir(out)) if fmt != "mmpack" else os.path.lexists(out)
    if occupied and not force:
        raise MMPackError(f"--out {out!r} exists; pass --force to replace it")


def _publish_file(out: str, force: bool, write) -> None:
    """Write ``out`` under a temporary name, then publish it: replacing only with ``force``."""
    temporary = _io.temporary_sibling(out)
    try:
        write(temporary)
        if force:
            os.replace(temporary, out)
        else:
            os.link(temporary, out)  # fails if another process created ``out`` meanwhile
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _publish_directory(out: str, force: bool, write) -> None:
    """Write a directory of files beside ``out``, then move it into place (its files into an
    existing ``out`` with ``force``); a failure leaves ``out`` as it was."""
    parent, name = os.path.split(os.path.abspath(out))
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".mmpack-tmp", dir=parent)
    try:
        write(staging)
        if os.path.isdir(out) and os.listdir(out):
            if not force:
                raise MMPackError(f"--out {out!r} exists; pass --force to replace it")
            for entry in sorted(os.listdir(staging)):
                os.replace(os.path.join(staging, entry), os.path.join(out, entry))
        else:
            os.replace(staging, out)  # atomic, over nothing or an empty directory
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cmd_gc(args: argparse.Namespace) -> int:
    repo = _open(args)
    report = repo.gc(grace_seconds=args.grace)
    print(f"removed {report.temporaries} temporary files, {report.objects} unreferenced objects and "
          f"{report.catalog} old catalog documents ({_bytes(report.bytes)})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.fleet:
        from mmpack.demo_fleet import FLEET_MODELS, run_fleet_demo

        ok = run_fleet_demo(models=args.models or FLEET_MODELS, directory=args.dir, slice_models=args.slice)
        return 0 if ok else 1
    from mmpack.demo import run_demo

    figures = run_demo(models=args.models or 5000, cycles=args.cycles, directory=args.dir)
    return 0 if all(f.verified for f in figures.values()) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from mmpack.evaluation import paper

    if args.suite != "paper":
        raise UsageError(f"unknown benchmark {args.suite!r}")
    paper.main(args.rest)
    return 0


# -- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mmpack", description="Manage versioned sets of same-architecture models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    def repository_command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        p = command(name, handler, help_text)
        p.add_argument("repo", help="a repository directory, or a URL such as s3://bucket/prefix")
        p.add_argument("--storage-options", metavar="JSON",
                       help="options of the URL's file system as a JSON object, e.g. "
                            '\'{"profile": "prod"}\' (default for URLs: $MMPACK_STORAGE_OPTIONS)')
        return p

    p = repository_command("log", cmd_log, "list versions, oldest first (or a model's history, or the tag log)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tags", action="store_true", help="every move of every tag, oldest first")
    which.add_argument("--model", type=non_negative_int, metavar="N", help="the versions that changed model N")
    p = repository_command("diff", cmd_diff, "the models and tensors that differ between two versions")
    p.add_argument("a", help="a version id or tag")
    p.add_argument("b", help="a version id or tag")
    p = repository_command("tag", cmd_tag, "point a tag at a version (or remove it with --delete)")
    p.add_argument("name")
    p.add_argument("vid", nargs="?", help="the version (id or tag) the tag is to name")
    p.add_argument("--delete", action="store_true", help="remove the tag")
    p.add_argument("--expected", help="move only if the tag is on this version now (compare-and-swap)")
    p.add_argument("--message", default="", help="why, for the tag log")
    p = repository_command("prune", cmd_prune, "delete old versions; kept ones stay recoverable (gc frees the space)")
    p.add_argument("--keep-last", type=non_negative_int, metavar="N", help="keep the newest N versions")
    p.add_argument(
        "--newer-than",
        type=moment,
        metavar="TIME",
        help="keep versions created since TIME (ISO 8601 or an age like 90d)",
    )
    p.add_argument("--keep", action="append", default=[], metavar="VERSION", help="keep this version (repeatable)")
    p.add_argument("--untagged", action="store_true", help="also delete tagged versions not otherwise kept")
    p.add_argument("--dry-run", action="store_true", help="show what would go and how many bytes that frees")
    p.add_argument("--message", default="", help="why, for the catalog")
    p.add_argument("--allow-import", action="store_true", help="retrain provenance versions that must be rewritten")
    repository_command("upgrade", cmd_upgrade, "turn a format 1 repository into format 2 (no other writer meanwhile)")
    p = repository_command("show", cmd_show, "describe one version: architecture, approach, chain, bytes by kind")
    p.add_argument("vid")
    repository_command("du", cmd_du, "storage by approach and by kind, against full snapshots")
    p = repository_command("verify", cmd_verify, "check checksums and that versions recover; exit 1 on any problem")
    p.add_argument("vid", nargs="?")
    p.add_argument(
        "--allow-import", action="store_true", help="retrain provenance versions (imports their training code)"
    )
    p = repository_command("recover", cmd_recover, "export models of a version")
    p.add_argument("vid")
    p.add_argument("--models", help="models to export, e.g. 3,17,40-45 (default: all)")
    p.add_argument("--out", required=True, help="output file (mmpack) or directory (torch, safetensors)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="mmpack")
    p.add_argument("--force", action="store_true", help="replace an existing output (files of the same names)")
    p.add_argument(
        "--allow-import", action="store_true", help="retrain provenance versions (imports their training code)"
    )
    p = repository_command("gc", cmd_gc, "remove leftovers of interrupted saves")
    p.add_argument("--grace", type=seconds, default=3600.0,
                   help="keep leftovers younger than this many seconds (finite, 0 or more; default 3600)")
    p = command("demo", cmd_demo, "the end-to-end demo on battery-cell models (--fleet: a million models)")
    p.add_argument("--models", type=positive_int, default=None,
                   help="battery cells, one model each (default 5000; with --fleet, 1000000)")
    p.add_argument("--cycles", type=non_negative_int, default=3, help="update cycles (default 3)")
    p.add_argument("--dir", default=None, help="a new directory for the demo (default ./mmpack-demo)")
    p.add_argument("--fleet", action="store_true",
                   help="a fleet larger than memory: saved from slices, updated, partly recovered (20 GB for 10^6)")
    p.add_argument("--slice", type=positive_int, default=50_000, help="with --fleet: models per slice (default 50000)")
    p = command("bench", cmd_bench, "run a benchmark suite (paper: the paper's evaluation)")
    p.add_argument("suite", choices=["paper"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite (see: mmpack bench paper --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mmpack`` command with ``argv`` (default: the process arguments); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
        sys.stdout.flush()  # a reader that went away shows here, not in the exit flush
        return status
    except BrokenPipeError as exc:
        if _stdout_closed():
            return 0  # `mmpack log repo | head` ends quietly, like other tools
        return _failure(args, exc)
    except UsageError as exc:
        if args.debug:
            raise
        parser.error(str(exc))
    except (MMPackError, OSError, KeyError, ValueError) as exc:
        return _failure(args, exc)
    except KeyboardInterrupt:
        print("mmpack: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or a library's error nothing translated: still one line
        return _failure(args, exc, f"unexpected {type(exc).__name__} (rerun with --debug for the traceback): ")
    return 0


def _failure(args: argparse.Namespace, exc: Exception, prefix: str = "") -> int:
    """Report ``exc`` as one line on stderr (or re-raise it with ``--debug``); exit status 1."""
    if args.debug:
        raise exc
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    print(f"mmpack: error: {prefix}{one_line(message)}", file=sys.stderr)
    return 1


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone; stdout then points at /dev/null, so the exit is quiet.

    SIGPIPE is not reset to its default instead: that would also kill the process, without a word, when a
    socket to object storage is closed by its peer, and it would outlive ``main`` in a caller's process.
    """
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is not a file
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


if __name__ == "__main__":
    sys.exit(main())
