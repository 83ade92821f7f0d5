"""Suite-wide wiring: where ``@pytest.mark.kvm`` tests run (see nested_plugin)."""

import pytest

from nested_plugin import NestedKvm


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(NestedKvm(config), "smolvmm-nested-kvm")


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """API tests run on both anyio backends."""
    return request.param
