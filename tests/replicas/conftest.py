"""tests/replicas/: the in-process fixtures of tests/http (a fake engine) for the forwarding tests."""
from tests.http.conftest import anyio_backend, served, tokenizer  # noqa: F401 - fixtures
