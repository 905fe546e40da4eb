import tempfile

import pytest

from sandbox.client import Sandbox
from sandbox.service import SandboxService


@pytest.fixture(scope="module")
def sandbox(request):
    """A sandbox of the module's own (its settings never leak into another module's tests); a module
    that needs no mail servers says SANDBOX_WITH_MAIL = False."""
    with_mail = getattr(request.module, "SANDBOX_WITH_MAIL", True)
    prefix = f"m365-{request.module.__name__.removeprefix('test_')}-"
    service = SandboxService(tempfile.mkdtemp(prefix=prefix), ports="auto", with_mail=with_mail).start()
    yield Sandbox(service.description())
    service.stop()


@pytest.fixture
def box(sandbox):
    sandbox.reset()
    return sandbox
