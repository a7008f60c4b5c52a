"""Shared fixtures: the embedded AWS (moto server on 127.0.0.1) and its resources.

The whole suite runs under pytest-socket with only loopback allowed
(`--allow-hosts=127.0.0.1,::1` in pyproject), so nothing can leave the machine
even when the code under test is wrong.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("AWS_PROFILE", None)
# moto server's request log drowns the output of a failing test.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the session; tests isolate themselves by resource names."""
    from moto.server import ThreadedMotoServer

    from sdeks.local import make_moto_faithful

    make_moto_faithful()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture(scope="session")
def aws(moto_endpoint: str):
    """boto3 clients for the moto server: ``aws.sqs``, ``aws.sns``, ``aws.s3``, ``aws.dynamodb``."""
    from types import SimpleNamespace

    from sdeks import aws as sdeks_aws

    return SimpleNamespace(
        endpoint=moto_endpoint,
        **{
            name: sdeks_aws.client(name, endpoint_url=moto_endpoint)
            for name in ("sqs", "sns", "s3", "dynamodb")
        },
    )


@pytest.fixture
def stack(aws):
    """A freshly named copy of the stack's resources (runtime `sdruntime`)."""
    from sdeks.names import StackNames
    from sdeks.resources import create_stack_resources

    names = StackNames(prefix=f"t{uuid.uuid4().hex[:10]}")
    return create_stack_resources(
        sns=aws.sns,
        sqs=aws.sqs,
        s3=aws.s3,
        dynamodb=aws.dynamodb,
        runtimes=["sdruntime"],
        names=names,
    )


# First: xdist's worker plugin turns these marks into nodeid suffixes in its own hook.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): each test file stays
    on one worker, so its module fixtures (a stack, a pod) are built once. The
    packages whose files share a package fixture (the embedded stack of `tests/e2e`,
    the hostile stack of `tests/reliability`) stay whole on one worker: a package
    fixture is torn down whenever its worker turns to another package, and built again
    when it comes back."""
    for item in items:
        path = item.nodeid.split("::")[0]
        group = next((p for p in _WHOLE_PACKAGES if path.startswith(p + "/")), path)
        item.add_marker(pytest.mark.xdist_group(group))


#: Test packages with package-scoped fixtures: one xdist group each.
_WHOLE_PACKAGES = ("tests/e2e", "tests/reliability")
