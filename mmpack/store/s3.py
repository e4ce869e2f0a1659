"""The S3 requests fsspec's generic interface does not offer (see :class:`S3Client`)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from mmpack.store.filesystems import timestamp

SINGLE_PUT_LIMIT = 5 * 2**30  # S3's limit for one PUT; larger objects go up in parts
WRITER_TOKEN = "mmpack-writer"  # object metadata naming the put_if_absent call that created a key

Content = bytes | np.ndarray  # what a PUT sends: small documents as bytes, objects as uint8 arrays


class S3Client:
    """The S3 requests fsspec's generic interface does not offer: conditional PUTs with a writer
    token, a ranged GET that also returns the object's size, single-request GETs, and the
    multipart uploads ``clean_temporaries`` aborts."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def put(self, path: str, content: Content, *, create: bool, token: str | None) -> None:
        if isinstance(content, np.ndarray):
            # botocore takes bytes or a file; a file over the array spares copying it into bytes.
            content = _ArrayFile(content) if len(content) < SINGLE_PUT_LIMIT else content.tobytes()
        extra: dict[str, Any] = {}
        if create:
            extra["mode"] = "create"
        if token is not None:
            extra["Metadata"] = {WRITER_TOKEN: token}
        # One PUT up to S3's limit, instead of s3fs's default of parts above 100 MiB.
        self.fs.pipe_file(path, content, chunksize=SINGLE_PUT_LIMIT // 2, **extra)

    def get(self, path: str) -> bytes:
        return self.fs.cat_file(path, max_concurrency=1)  # no HEAD first, no parallel parts: one GET

    def keys_after(self, folder: str, after: str, strip: int) -> list[str]:
        """Keys directly in ``folder`` (a path ending in '/') that sort after the path ``after``."""
        bucket, prefix, _ = self.fs.split_path(folder)
        _, start, _ = self.fs.split_path(after)
        prefix = prefix.rstrip("/") + "/"
        keys, token = [], None
        while True:
            page = self.call("list_objects_v2", Bucket=bucket, Prefix=prefix, StartAfter=start, Delimiter="/",
                             **({"ContinuationToken": token} if token else {}))
            keys += [f"{bucket}/{item['Key']}"[strip:] for item in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(k for k in keys if not k.rsplit("/", 1)[-1].startswith("."))

    def call(self, method: str, **kwargs: Any) -> Any:
        """One S3 request, through s3fs's ``_call_s3`` (where retries and error translation live)."""
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def head(self, path: str, length: int) -> tuple[bytes, int | None]:
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, self._head, path, length)
        except FileNotFoundError:
            raise
        except OSError:
            if self.fs.info(path)["size"] == 0:  # an empty object has no byte 0 to range over (416)
                return b"", 0
            raise

    async def _head(self, path: str, length: int) -> tuple[bytes, int | None]:
        bucket, key, _ = self.fs.split_path(path)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{length - 1}")
        try:
            data = await response["Body"].read()
        finally:
            response["Body"].close()
        total = response.get("ContentRange", "").rpartition("/")[2]
        return data, int(total) if total.isdigit() else None

    def writer_token(self, path: str) -> str | None:
        bucket, key, _ = self.fs.split_path(path)
        return self.call("head_object", Bucket=bucket, Key=key).get("Metadata", {}).get(WRITER_TOKEN)

    def abort_uploads(self, root: str, initiated_before: float) -> int:
        bucket, prefix, _ = self.fs.split_path(root)
        prefix = f"{prefix}/" if prefix else ""
        aborted = 0
        markers: dict[str, str] = {}
        while True:
            page = self.call("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            for upload in page.get("Uploads", []):
                if timestamp(upload["Initiated"]) < initiated_before:
                    self.call("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


class _ArrayFile(io.RawIOBase):
    """A seekable read-only file over a uint8 array, with a length: a PUT body without a copy."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__()
        self._view = memoryview(array).cast("B")
        self._position = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = min(max(base + offset, 0), len(self._view))
        return self._position

    def readinto(self, target: Any) -> int:
        n = min(len(target), len(self._view) - self._position)
        memoryview(target).cast("B")[:n] = self._view[self._position : self._position + n]
        self._position += n
        return n
