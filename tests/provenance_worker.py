"""Subprocess side of test_provenance_hostile.py: verify and recover on request, one JSON line each.

    python provenance_worker.py      reads requests {"op": "verify" | "recover", "repo": PATH,
                                     "vid": VID, "allow": BOOL, "indices": [..] | null} from stdin,
                                     one per line, and answers each with one line: the report's
                                     problems, or the error's type and message. Its address space
                                     is limited to 3 GiB, so a read that never ends fails here,
                                     not in the test process.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

import mmpack

torch.set_num_threads(1)
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def answer(request: dict) -> dict:
    repo = mmpack.Repository(request["repo"], create=False)
    try:
        if request["op"] == "verify":
            report = repo.verify(request["vid"], allow_import=request["allow"])
            return {"ok": report.ok, "problems": report.problems, "not_retrained": report.not_retrained}
        ms = repo.recover(request["vid"], request.get("indices"), allow_import=request["allow"])
        return {"ok": True, "hashes": ms.hashes().tolist()}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__, "message": str(exc),
                "classes": [c.__name__ for c in type(exc).__mro__]}


for line in sys.stdin:
    print(json.dumps(answer(json.loads(line))), flush=True)
