"""The OpenAPI document (`GET /openapi.json`) against the server it describes and against OpenAI's
published spec: every documented operation is routed, real responses validate against the
document's own schemas, and the routes shared with OpenAI match its paths, methods and fields."""

import json

import httpx
import jsonschema
import pytest
import yaml

from conftest import ADMIN_TOKEN, MODEL, ROOT

KEY = "sk-sdk-test"
OPENAI_SPEC = ROOT.parent / "shared" / "reference" / "openai-openapi.yaml"


@pytest.fixture(scope="module")
def doc(server):
    r = httpx.get(server + "/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def openai_spec():
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(OPENAI_SPEC) as f:
        return yaml.load(f, Loader=loader)


def check(doc, name, instance):
    """Validates `instance` against the document's schema `name` (refs resolve in the document)."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_served_document_is_the_checked_in_one(doc):
    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert doc == checked_in
    assert doc["openapi"].startswith("3.1")


def test_every_documented_operation_is_routed(server, doc):
    """Called without credentials: a guarded route answers 401, an open one anything but 404/405.
    A route the router lacks would answer 404 `route_not_found` (or 405)."""
    for path, ops in doc["paths"].items():
        concrete = path.replace("{name}", "style.css").replace("{id}", "x")
        for method, op in ops.items():
            r = httpx.request(method.upper(), server + concrete, follow_redirects=False, timeout=60,
                              json={} if method in ("post", "put") else None)
            guarded = "security" in op
            if guarded:
                assert r.status_code == 401, (method, path, r.status_code, r.text)
            else:
                assert r.status_code not in (404, 405), (method, path, r.status_code, r.text)
                assert str(r.status_code) in op["responses"], (method, path, r.status_code)


def test_responses_match_the_documents_own_schemas(server, doc):
    auth = {"Authorization": f"Bearer {KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5,
            "logprobs": True, "top_logprobs": 2}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=auth, timeout=120)
    assert r.status_code == 200
    check(doc, "ChatCompletion", r.json())
    with httpx.stream("POST", server + "/v1/chat/completions", headers=auth, timeout=120,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(chunks) > 2
    item = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"][
        "text/event-stream"]["itemSchema"]
    assert item == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    for c in chunks:
        check(doc, "ChatCompletionChunk", c)
    check(doc, "ModelList", httpx.get(server + "/v1/models", headers=auth).json())
    check(doc, "ModelObject", httpx.get(server + f"/v1/models/{MODEL}", headers=auth).json())
    bad = httpx.post(server + "/v1/chat/completions", json={**body, "temperature": 9}, headers=auth)
    assert bad.status_code == 400
    check(doc, "ErrorBody", bad.json())
    r = httpx.post(server + "/v1/messages", headers={"x-api-key": KEY}, timeout=120,
                   json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200
    check(doc, "MessagesResponse", r.json())
    check(doc, "ListOfAccountObject", httpx.get(server + "/admin/accounts", headers=admin).json())
    check(doc, "ListOfKeyObject", httpx.get(server + "/admin/keys", headers=admin).json())
    usage = httpx.get(server + "/admin/usage?group_by=model", headers=admin).json()
    check(doc, "UsageResponse", usage)
    assert usage["data"], usage
    recent = httpx.get(server + "/admin/requests?limit=3", headers=admin).json()
    check(doc, "ListOfRequestRow", recent)
    assert recent["data"], recent
    # And the schemas are not vacuous: a wrong shape fails.
    with pytest.raises(jsonschema.ValidationError):
        check(doc, "ChatCompletion", {"id": 1, "choices": "none"})


def _flatten(spec, s, depth=0):
    """A schema's properties and required fields, through $ref and allOf."""
    if depth > 8:
        return {}, set()
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return _flatten(spec, spec["components"]["schemas"][name], depth + 1)
    props, req = dict(s.get("properties", {})), set(s.get("required", []))
    for part in s.get("allOf", []):
        p, r = _flatten(spec, part, depth + 1)
        props.update(p)
        req |= r
    return props, req


SHARED = [  # (our path, OpenAI's path, method)
    ("/v1/chat/completions", "/chat/completions", "post"),
    ("/v1/chat/completions", "/chat/completions", "get"),
    ("/v1/chat/completions/{id}", "/chat/completions/{completion_id}", "get"),
    ("/v1/chat/completions/{id}", "/chat/completions/{completion_id}", "post"),
    ("/v1/chat/completions/{id}", "/chat/completions/{completion_id}", "delete"),
    ("/v1/chat/completions/{id}/messages", "/chat/completions/{completion_id}/messages", "get"),
    ("/v1/models", "/models", "get"),
    ("/v1/models/{id}", "/models/{model}", "get"),
]

# Fields of OpenAI's request this server does not read: accepted and ignored, like any unknown
# field (docs/operations.md lists them).
NOT_READ = {"moderation", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
            "safety_identifier", "verbosity"}
# parlance's additive request fields (README, docs/apps.md).
ADDITIVE = {"ab_campaign", "ignore_eos", "labels", "max_ttft_ms", "min_p", "repetition_penalty",
            "session_id", "system_prompt_args", "tags", "top_k", "use_tools"}


def test_shared_routes_match_openais_spec(doc, openai_spec):
    for ours, theirs, method in SHARED:
        assert method in doc["paths"][ours], (ours, method)
        assert method in openai_spec["paths"][theirs], (theirs, method)
    pairs = [  # (our schema, OpenAI's schema, ours is a response)
        ("ChatCompletion", "CreateChatCompletionResponse", True),
        ("ChatCompletionChunk", "CreateChatCompletionStreamResponse", True),
        ("ModelObject", "Model", True),
        ("ModelList", "ListModelsResponse", True),
        ("Usage", "CompletionUsage", True),
        ("CreateChatCompletionRequest", "CreateChatCompletionRequest", False),
    ]
    for ours, theirs, response in pairs:
        our_props, our_req = _flatten(doc, {"$ref": f"#/components/schemas/{ours}"})
        their_props, their_req = _flatten(openai_spec, {"$ref": f"#/components/schemas/{theirs}"})
        missing = their_req - set(our_props)
        assert not missing, f"{ours} lacks {theirs}'s required {missing}"
        if response:
            continue
        # A request: every field OpenAI defines is read here, or knowingly not; every other
        # field is one of ours.
        assert set(their_props) - set(our_props) == NOT_READ
        assert set(our_props) - set(their_props) == ADDITIVE
        # Our required fields are OpenAI's required fields.
        assert our_req <= their_req, our_req - their_req
