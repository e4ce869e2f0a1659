"""Model sets on an accelerator: the staging path checked bit for bit, then timed against torch's copies.

    python bench/devices.py [--device cuda] [--models 5000] [--runs 5] [--dir DIR]

Checks first (each prints ``ok``; the first mismatch stops the script with
a non-zero exit): a set moved to the device and back, hashed there, saved
from there (``mmpack.save`` writes the very bytes a host save writes;
``repo.save`` blocking and non-blocking, with the device tensors changed in
place right after submission), stacked from modules on the device, loaded
and recovered onto it (``device=``, ``map_location=``) and into device
tensors (``out=``, whole and a few models).

Then timings, medians of ``runs`` rounds run round-robin, each against a
peer doing the same bytes in the same run:

* device to host: the staging of a non-blocking save (two pinned chunks,
  copied into reused host buffers) and a hashed host copy (what a blocking
  save does) against ``tensor.to("cpu", non_blocking=True)`` of every
  stacked tensor plus a synchronisation;
* host to device: ``ms.to(device)`` against ``tensor.to(device)``;
* recovery onto the device: ``mmpack.load(device=)``, ``repo.recover(device=)``
  and ``repo.recover(out=)`` into device tensors against
  ``safetensors.torch.load_file(device=)`` of the same set.

Without a GPU, ``--device cpu`` runs the same code with host memory standing
in for the device (``mmpack.staging.host_as_device``), the path the tests
take; the timings then compare host copies with host copies. On the GPU
machine: ``pip install --no-build-isolation --no-deps .`` then run it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys

import numpy as np
import safetensors.torch
import torch
from _common import describe_machine, interleaved_medians, parse_args, prime_memory, print_table, work_dir

import mmpack
from mmpack import ModelSet, staging
from mmpack.repository import background
from mmpack.workloads import ffnn48, make_models


def check(name: str, ok: bool) -> None:
    if not ok:
        raise SystemExit(f"MISMATCH: {name}")
    print(f"ok  {name}")


def main() -> None:
    argv = sys.argv[1:]
    device_name = "cuda"
    if "--device" in argv:
        at = argv.index("--device")
        device_name = argv[at + 1]
        del argv[at : at + 2]
    args = parse_args(__doc__.splitlines()[0], argv=argv)
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/devices.py: no CUDA device here (torch.cuda.is_available() is False): nothing was "
                         "checked. Run it on a GPU machine, or with --device cpu for the host stand-in.")
    print(describe_machine())
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    stand_in = staging.host_as_device() if device.type == "cpu" else contextlib.nullcontext()
    prime_memory()
    with stand_in, work_dir(args.dir) as directory:
        host = ModelSet.from_modules(make_models(ffnn48, args.models))
        print(f"{args.models} FFNN-48 models, {host.nbytes / 1e6:.1f} MB, staging chunks of "
              f"{staging.CHUNK_BYTES >> 20} MiB\n")
        on_device = checks(host, device, directory)
        print()
        timings(host, on_device, device, directory, args.runs)


def checks(host: ModelSet, device: torch.device, directory: str) -> ModelSet:
    on_device = host.to(device)
    check("ms.to(device) holds the host set's bytes", on_device.device == device and on_device.equal(host))
    check("hashes of the device set", np.array_equal(on_device.hashes(), host.hashes()))
    check("ms.to('cpu') comes back bit-exact", on_device.to("cpu").equal(host))
    small = ModelSet.from_modules(make_models(ffnn48, 64, seed=1))
    check("chunks smaller than a row", small.to(device, chunk_bytes=100).to("cpu", chunk_bytes=77).equal(small))
    modules = [copy.deepcopy(m).to(device) for m in make_models(ffnn48, 64, seed=1)]
    stacked = ModelSet.from_modules(modules)
    check("from_modules of device modules stays on the device", stacked.device == device and stacked.equal(small))
    back = stacked.to_modules(lambda: ffnn48().to(device))
    check("to_modules onto device modules", ModelSet.from_modules([m.cpu() for m in back]).equal(small))

    host_file, device_file = io.BytesIO(), io.BytesIO()
    mmpack.save(host, host_file)
    mmpack.save(on_device, device_file)
    check("mmpack.save from the device writes the host save's bytes", device_file.getvalue() == host_file.getvalue())
    path = os.path.join(directory, "set.mmpack")
    with open(path, "wb") as f:
        f.write(host_file.getvalue())
    loaded = mmpack.load(path, device=device)
    check("mmpack.load(device=)", loaded.device == device and loaded.equal(host))
    location = str(device) if device.type != "cuda" else f"cuda:{device.index or 0}"
    check("mmpack.load(map_location=)", mmpack.load(path, map_location=location).equal(host))
    some = mmpack.load(path, indices=[9, 2, 9], device=device)
    check("mmpack.load(indices=, device=)", some.equal(host.select([9, 2, 9])))

    repo = mmpack.Repository(os.path.join(directory, "checks.repo"))
    v1 = repo.save(on_device)
    check("repo.save from the device", repo.recover(v1).equal(host))
    work = host.to(device)
    if work is host:  # the stand-in: work on a copy, not on the set the checks compare with
        work = ModelSet(host.architecture, {n: t.clone() for n, t in host.tensors.items()})
    expected = work.to("cpu").select(range(len(work)))
    future = repo.save(work, approach="update", base=v1, blocking=False)
    with torch.no_grad():
        for t in work.tensors.values():
            t.add_(1.0)  # right after submission, on the device
    check("a non-blocking save from the device keeps the values at submission",
          repo.recover(future.result()).equal(expected))
    v3 = repo.save(work, approach="update", base=future.result())
    recovered = repo.recover(v3, device=device)
    check("repo.recover(device=)", recovered.device == device and recovered.equal(work))
    target = host.to(device)
    if target is host:
        target = ModelSet(host.architecture, {n: t.clone() for n, t in host.tensors.items()})
    repo.recover(v3, out=target)
    check("repo.recover(out=device set)", target.equal(work))
    repo.recover(v1, indices=[5, 70], out=target)
    rows = target.to("cpu")
    check("repo.recover(indices=, out=) changes only those rows",
          rows.select([5, 70]).equal(host.select([5, 70])) and rows.select([4, 6, 71]).equal(work.select([4, 6, 71])))
    mmpack.load(path, out=target)
    check("mmpack.load(out=device set)", target.equal(host))
    repo.close()
    return on_device


def timings(host: ModelSet, on_device: ModelSet, device: torch.device, directory: str, runs: int) -> None:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pool = background.StagingPool(1)
    background.stage(on_device, pool).release()
    host_tensors = list(host.tensors.values())
    device_tensors = list(on_device.tensors.values())

    def torch_d2h():
        moved = [t.to("cpu", non_blocking=True) for t in device_tensors]
        sync()
        return moved

    def torch_h2d():
        moved = [t.to(device) for t in host_tensors]
        sync()
        return moved

    path = os.path.join(directory, "set.mmpack")
    st_path = os.path.join(directory, "set.safetensors")
    safetensors.torch.save_file({n: t.contiguous() for n, t in host.tensors.items()}, st_path)
    repo_path = os.path.join(directory, "timing.repo")
    repo = mmpack.Repository(repo_path)
    vid = repo.save(host)
    target = host.to(device)
    if target is host:
        target = ModelSet(host.architecture, {n: t.clone() for n, t in host.tensors.items()})
    cases = {
        "device -> host: tensor.to('cpu', non_blocking=True) + sync": torch_d2h,
        "device -> host: staging of a non-blocking save": lambda: background.stage(on_device, pool).release(),
        "device -> host: hashed host copy (a blocking save's)": lambda: on_device._to_host_hashed(),
        "host -> device: tensor.to(device)": torch_h2d,
        "host -> device: ms.to(device)": lambda: host.to(device),
        "load onto device: safetensors.torch.load_file(device=)": lambda: (
            safetensors.torch.load_file(st_path, device=str(device)), sync()),
        "load onto device: mmpack.load(device=)": lambda: mmpack.load(path, device=device),
        "load onto device: repo.recover(device=)": lambda: repo.recover(vid, device=device),
        "load onto device: repo.recover(out=device set)": lambda: repo.recover(vid, out=target),
    }
    medians = interleaved_medians(cases, max(runs, 5))
    peers = {"device -> host": cases_peer(medians, "device -> host: tensor.to"),
             "host -> device": cases_peer(medians, "host -> device: tensor.to"),
             "load onto device": cases_peer(medians, "load onto device: safetensors")}
    rows = []
    for name, seconds in medians.items():
        peer = peers[name.split(":")[0]]
        rows.append([name, f"{seconds * 1e3:.1f}", f"{host.nbytes / seconds / 1e9:.2f}", f"{peer / seconds:.2f}"])
    print_table(["operation", "ms", "GB/s", "speed vs torch's peer"], rows)
    repo.close()


def cases_peer(medians: dict[str, float], prefix: str) -> float:
    return next(seconds for name, seconds in medians.items() if name.startswith(prefix))


if __name__ == "__main__":
    main()
