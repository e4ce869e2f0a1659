"""The fsspec store on a real S3 endpoint (moto's server on loopback, through s3fs): the
conformance suite with conditional writes and with claims, and what only S3 does."""

from __future__ import annotations

import secrets

import pytest

from mmpack.store import FsspecStore, s3
from mmpack.store.instrumented import instrument
from mmpack.testing import StoreTests

pytest.importorskip("s3fs")


class TestS3Store(StoreTests):
    """Conditional PUTs (``If-None-Match: *``), found by the store's probe."""

    @pytest.fixture
    def store(self, s3_server):
        store = FsspecStore(s3_server.url("store"), s3_server.storage_options)
        assert store.conditional_writes
        return store


class TestS3StoreWithClaims(StoreTests):
    """The fallback for servers without conditional writes, on the same S3 server."""

    @pytest.fixture
    def store(self, s3_server):
        return FsspecStore(s3_server.url("claims"), s3_server.storage_options, conditional_writes=False)


def test_a_server_that_ignores_conditions_is_detected(s3_server, monkeypatch):
    real_put = s3.S3Client.put

    def ignoring(self, path, content, *, create, token):
        return real_put(self, path, content, create=False, token=token)

    monkeypatch.setattr(s3.S3Client, "put", ignoring)
    store = FsspecStore(s3_server.url(), s3_server.storage_options)
    assert not store.conditional_writes  # a second create-only PUT succeeded: claims instead
    assert store.put_if_absent("versions/v1.json", b"a") and not store.put_if_absent("versions/v1.json", b"b")


def test_a_conditional_put_is_one_request_and_recognises_its_own_retry(s3_server, monkeypatch):
    store = FsspecStore(s3_server.url(), s3_server.storage_options, conditional_writes=True)
    log = instrument(store)
    monkeypatch.setattr(secrets, "token_hex", lambda n: "a" * 2 * n)
    assert store.put_if_absent("versions/v1.json", b"manifest")
    assert log.requests == 1
    # The same call again, as when a PUT succeeded but its response was lost and it was retried:
    assert store.put_if_absent("versions/v1.json", b"manifest")
    monkeypatch.setattr(secrets, "token_hex", lambda n: "b" * 2 * n)
    assert not store.put_if_absent("versions/v1.json", b"other")  # another writer's key
    assert store.get("versions/v1.json") == b"manifest"


def test_reading_an_object_fetches_its_head_and_size_in_one_request(s3_server):
    store = FsspecStore(s3_server.url(), s3_server.storage_options)
    store.put("objects/a", bytes(range(256)) * 1000)
    log = instrument(store)
    with store.open_reader("objects/a") as reader:
        assert reader.size() == 256_000
        assert reader.read(10, 20, "x") == bytes(range(10, 30))
    assert dict(log.by_kind) == {"get_object": 1}
    store.put("objects/empty", b"")
    with store.open_reader("objects/empty") as reader:
        assert reader.size() == 0


def test_clean_temporaries_aborts_abandoned_multipart_uploads(s3_server):
    store = FsspecStore(s3_server.url(), s3_server.storage_options)
    bucket, key, _ = store.fs.split_path(f"{store.root}/objects/huge.mmpack")
    store._s3.call("create_multipart_upload", Bucket=bucket, Key=key)
    # moto dates every upload 2010-11-10, so only the removal can be checked here, not the age test.
    assert store.clean_temporaries(0).removed == 1
    assert store._s3.call("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []) == []


def test_a_missing_bucket_is_a_clear_error(s3_server):
    from mmpack import RepositoryError

    store = FsspecStore("s3://no-such-bucket/repo", s3_server.storage_options)
    with pytest.raises(RepositoryError, match="does the bucket exist"):
        store.put("objects/a", b"1")


def test_a_conflicting_conditional_put_is_retried(s3_server, monkeypatch):
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    real_put = s3.S3Client.put
    calls = []

    def conflicted_once(self, path, content, *, create, token):
        calls.append(path)
        if len(calls) == 1:  # S3's answer when two conditional PUTs of one key are in flight
            conflict = {"Error": {"Code": "ConditionalRequestConflict", "Message": "retry"}}
            raise translate_boto_error(ClientError(conflict, "PutObject"))
        return real_put(self, path, content, create=create, token=token)

    store = FsspecStore(s3_server.url(), s3_server.storage_options, conditional_writes=True)
    monkeypatch.setattr(s3.S3Client, "put", conflicted_once)
    assert store.put_if_absent("versions/v1.json", b"m") and len(calls) == 2
    assert store.get("versions/v1.json") == b"m"
