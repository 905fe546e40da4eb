import tempfile

import pytest

from sandbox.client import Sandbox
from sandbox.service import SandboxService


@pytest.fixture(scope="session")
def identity_sandbox():
    """The identity endpoint alone, on free ports, with a fresh seed."""
    service = SandboxService(tempfile.mkdtemp(prefix="m365-identity-"), ports="auto", with_mail=False).start()
    yield Sandbox(service.description())
    service.stop()


@pytest.fixture
def fresh(identity_sandbox):
    """Resets the directory (seed, counters, faults) before a test that changes it."""
    identity_sandbox.reset()
    return identity_sandbox


@pytest.fixture(scope="session")
def sandbox():
    """The whole sandbox (identity, Dovecot IMAP/POP3/LMTP, SMTP) on free ports."""
    service = SandboxService(tempfile.mkdtemp(prefix="m365-sandbox-"), ports="auto").start()
    handle = Sandbox(service.description())
    handle.service = service
    yield handle
    service.stop()


@pytest.fixture
def box(sandbox):
    """The whole sandbox, reset before the test."""
    sandbox.reset()
    return sandbox
