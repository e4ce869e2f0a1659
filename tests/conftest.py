import pytest

pytest.register_assert_rewrite("mmpack.testing")  # the shipped store suite reports its asserts like a test

import logging
import os
import socket
import uuid
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Tests build models from fixed seeds; keep the global generator from leaking between tests."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


@dataclass(frozen=True)
class S3Server:
    """A local S3-compatible endpoint: ``url(name)`` gives a fresh repository URL in its bucket."""

    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> dict:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def url(self, name: str = "repo") -> str:
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), in a thread of this process, with one bucket.

    Tests that use it are skipped when s3fs or moto is missing; ``.ci/run`` installs both.
    """
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        found = S3Server(f"http://127.0.0.1:{port}", "mmpack-tests")
        from mmpack.store import FsspecStore

        store = FsspecStore(f"s3://{found.bucket}", found.storage_options)
        store._s3.call("create_bucket", Bucket=found.bucket)
        yield found
    finally:
        server.stop()
