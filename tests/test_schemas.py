"""The AsyncAPI and OpenAPI documents: generated from the schemas, current, valid, served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate
from servers import running

from pmhub import Hub, MemoryStore, SessionAuthenticator, StaticPolicy, schemas
from pmhub.adapters.asgi import PmhubApp
from pmhub.frames import ClientFrame, ServerFrame

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: The official JSON Schema of AsyncAPI 3.0.0 (from the npm package @asyncapi/specs, Apache-2.0).
ASYNCAPI_SCHEMA = Path(__file__).with_name("specs") / "asyncapi-3.0.0.json"
REGENERATE = "python -m pmhub.schemas --write docs"


@pytest.mark.parametrize("name", ["asyncapi.json", "openapi.json"])
def test_the_documents_in_docs_are_current(name: str) -> None:
    fresh = schemas.render(schemas.asyncapi() if name == "asyncapi.json" else schemas.openapi())
    assert (DOCS / name).read_text(encoding="utf-8") == fresh, f"run `{REGENERATE}`"


def asyncapi_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


def test_the_asyncapi_document_is_valid_asyncapi_3() -> None:
    assert asyncapi_errors(schemas.asyncapi()) == []
    broken = schemas.asyncapi()
    broken["channels"]["chat"]["address"] = 5  # the validator does look
    assert asyncapi_errors(broken)


def test_the_openapi_document_is_valid_openapi_3_1() -> None:
    validate(schemas.openapi())


def test_every_frame_type_is_a_message_with_its_fields() -> None:
    document = schemas.asyncapi()
    messages = document["components"]["messages"]
    components = document["components"]["schemas"]
    for frame in (*get_args(ClientFrame), *get_args(ServerFrame)):
        name = frame.__name__
        assert messages[name]["name"] == frame.__struct_config__.tag
        assert set(components[name]["properties"]) == {"type", *frame.__struct_fields__}
    sent = {
        op["messages"][0]["$ref"].rsplit("/", 1)[1]
        for op in document["operations"].values()
        if op["action"] == "receive"
    }
    assert sent == {frame.__name__ for frame in get_args(ClientFrame)}


def test_the_asgi_adapter_serves_both(tmp_path: Path) -> None:
    store = MemoryStore()
    hub = Hub(store, StaticPolicy({1, 2}))
    with running(PmhubApp(hub, SessionAuthenticator("0123456789abcdef", store))) as server:
        for name, build in (("asyncapi.json", schemas.asyncapi), ("openapi.json", schemas.openapi)):
            response = httpx.get(f"{server.url}/{name}")
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            assert response.json() == build()
