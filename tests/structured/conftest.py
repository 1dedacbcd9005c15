"""Structured outputs and tool calls against a real `lmserve serve demo` (the built-in demo model:
it writes prose, so JSON that parses and validates shows the constraint at work)."""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.conftest import SERVED_MODEL_NAME
from tests.gateway.conftest import gateway_factory  # noqa: F401  (a fixture, used by test_gateway.py)
from tests.services import Process

MODEL = SERVED_MODEL_NAME


@pytest.fixture(scope="session")
def demo_server(start_server) -> Process:
    return start_server(model="demo")


@pytest.fixture(scope="session")
def demo_client(demo_server) -> OpenAI:
    return OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
