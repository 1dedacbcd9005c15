"""Server tests use the `start_server` / `server` / `client` fixtures of tests/conftest.py."""

from tests.conftest import SERVED_MODEL_NAME as MODEL_NAME

__all__ = ["MODEL_NAME"]
