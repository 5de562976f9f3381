"""/docs works offline: no URL to another host, every asset served by the app itself (TestClient, no Ray)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fabric.config import load_config
from fabric.serve import docs as docs_module
from fabric.serve.api import make_asgi
from fabric.serve.docs import offline_docs, swagger_assets
from fabric.serve.service import build_service
from tests.unit.serve.models import make_model

# every URL a page makes the browser load: src/href attributes and Swagger UI's `url:` (the OpenAPI document)
_LOADED = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")
_EXTERNAL = re.compile(r"""(?:https?:)?//(?!127\.0\.0\.1[:/]|localhost[:/])[\w.-]+""")


def loaded_urls(page: str) -> list[str]:
    return [a or b for a, b in _LOADED.findall(page)]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The tabular app as a replica serves it (the inference fast path over FastAPI)."""
    folder = make_model(tmp_path_factory.mktemp("models") / "clf", seed=0)
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(
        None, ["serve.model_name=m", "monitor.enabled=false", f"run_dir={run_dir}", f"serve.model_uri={folder}"]
    )
    with TestClient(make_asgi(build_service(cfg), cfg.serve.max_body_bytes)) as c:
        yield c


def test_tabular_docs_reference_no_other_host_and_every_asset_loads_from_the_app(client: TestClient) -> None:
    if swagger_assets() is None:  # /docs is then the plain list (tested below)
        pytest.skip("no installed package ships Swagger UI (swagger-ui-bundle or vllm)")
    r = client.get("/docs")
    assert r.status_code == 200 and "SwaggerUIBundle" in r.text
    assert not _EXTERNAL.findall(r.text), _EXTERNAL.findall(r.text)
    assert '"validatorUrl": null' in r.text  # no call to validator.swagger.io either
    urls = [u for u in loaded_urls(r.text) if not u.startswith("data:")]
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/openapi.json"} <= set(urls)
    for url in urls:
        got = client.get(url)
        assert got.status_code == 200 and got.content, url
    assert "/v2/models/{name}/infer" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs/oauth2-redirect").status_code == 200
    redoc = client.get("/redoc", follow_redirects=False)
    assert redoc.status_code == 307 and redoc.headers["location"] == "/docs"


def test_urls_follow_the_root_path(client: TestClient) -> None:
    if swagger_assets() is None:
        pytest.skip("no installed package ships Swagger UI (swagger-ui-bundle or vllm)")
    prefixed = TestClient(client.app, root_path="/tabular")
    urls = loaded_urls(prefixed.get("/docs").text)
    assert "/tabular/docs/assets/swagger-ui-bundle.js" in urls and "/tabular/openapi.json" in urls


def test_without_assets_docs_is_a_plain_list_of_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs_module, "swagger_assets", lambda: None)
    app = FastAPI(title="t <app>")

    @app.post("/v1/things", summary="Make a <thing>")
    async def make() -> dict[str, str]:
        return {}

    offline_docs(app)
    page = TestClient(app).get("/docs").text
    assert "<script" not in page and not _EXTERNAL.findall(page)
    assert "<code>POST</code>" in page and "/v1/things" in page and "Make a &lt;thing&gt;" in page
    assert loaded_urls(page) == ["/openapi.json"]


def test_a_given_assets_folder_replaces_the_cdn_on_any_fastapi_app(tmp_path: Path) -> None:
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        (tmp_path / name).write_text(f"/* {name} */")
    app = FastAPI()
    offline_docs(app, tmp_path)
    c = TestClient(app)
    page = c.get("/docs").text
    assert "cdn.jsdelivr.net" not in page and "fastapi.tiangolo.com" not in page
    assert c.get("/docs/assets/swagger-ui.css").text == "/* swagger-ui.css */"
    assert [getattr(r, "path", None) for r in app.routes].count("/docs") == 1


def test_an_app_without_an_openapi_document_keeps_its_docs_off() -> None:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    offline_docs(app)
    assert TestClient(app).get("/docs").status_code == 404
