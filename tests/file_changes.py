"""Changes another process makes to a file under a reader (no mmpack import: mutators start fast)."""

from __future__ import annotations

import os
import random
import shutil

CHANGES = ("truncate", "overwrite", "extend", "replace", "rewrite")


def change(path: str, kind: str, where: float, size: int, rng: random.Random, other: str | None) -> None:
    """Change ``path`` as another process would: cut it, write over it in place, grow it, or
    rename another file over it; ``rewrite`` cuts it and writes its bytes back (a copy in place)."""
    length = os.path.getsize(path)
    at = int(where * length)
    if kind == "truncate":
        os.truncate(path, at)
    elif kind == "overwrite":
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(rng.randbytes(max(1, min(size, length - at))))
    elif kind == "extend":
        with open(path, "ab") as f:
            f.write(rng.randbytes(size))
    elif kind == "replace":
        temporary = path + ".new"
        if other is not None and rng.random() < 0.5:
            shutil.copyfile(other, temporary)
        else:
            with open(temporary, "wb") as f:
                f.write(rng.randbytes(at))
        os.replace(temporary, path)
    elif kind == "rewrite":
        with open(path, "rb") as f:
            data = f.read()
        os.truncate(path, at)
        with open(path, "r+b") as f:
            f.write(data)
    else:
        raise ValueError(kind)
