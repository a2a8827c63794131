"""The OpenAPI document lists every route the app has, with the request models the views validate with,
and the docs page shows them."""

from __future__ import annotations

import re


def test_the_document_covers_every_route_with_its_models(app, client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"] == "3.1.0"
    listed = {(m.upper(), p) for p, ms in doc["paths"].items() for m in ms}
    routes = {(m, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r.rule)) for r in app.url_map.iter_rules()
              if r.endpoint != "static" for m in r.methods - {"HEAD", "OPTIONS"}}
    assert listed == routes
    job = doc["components"]["schemas"]["JobRequest"]
    assert {"messages", "prompt", "max_tokens", "rag", "cache", "webhook"} <= set(job["properties"])
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobRequest"}
    assert "202" in submit["responses"] and submit["security"] == [{"bearer": []}]
    search = doc["paths"]["/v1/collections/{collection_id}/search"]["get"]
    assert {p["name"] for p in search["parameters"]} == {"collection_id", "q", "k", "mode", "filter"}
    # every $ref points at a schema the document has
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', client.get("/openapi.json").get_data(as_text=True)))
    assert refs <= set(doc["components"]["schemas"])


def test_the_docs_page_lists_the_endpoints(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "/v1/jobs/{job_id}" in page.get_data(as_text=True) and "JobRequest" in page.get_data(as_text=True)
