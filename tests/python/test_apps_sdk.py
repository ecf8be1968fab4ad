"""parlance's application layer through the official SDKs: stored completions (OpenAI's own
`chat.completions.retrieve/list/update/delete` and `messages.list`), projects with system-prompt
templates and server-side sessions, A/B campaigns with feedback and their report, and the
Anthropic door on a project's models. Extension fields go in the SDKs' `extra_body`; extension
fields of responses are read from `model_extra`. Plain responses, lists and stream chunks are
validated against OpenAI's published spec where it has a schema for them.

The `server` fixture is shared by the whole session (one account: the static key), so every test
names its projects, campaigns and metadata with a fresh uuid."""

import json
import subprocess
import sys
import uuid

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import ADMIN_TOKEN, MODEL, ROOT

VALIDATOR = ROOT.parent / "shared" / "tools" / "validate_schema.py"
KEY = "sk-sdk-test"


def validate(payload: str, schema: str | None = None):
    """Check a JSON document, JSON Lines or an SSE stream against OpenAI's spec (the schema is
    auto-detected from `object` unless named)."""
    args = [sys.executable, str(VALIDATOR)] + (["--schema", schema] if schema else []) + ["-"]
    r = subprocess.run(args, input=payload, text=True, capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr


def validate_chunks(chunks):
    validate("\n".join(json.dumps(c.to_dict()) for c in chunks))


def strict(model_obj):
    """Round-trip through the SDK's pydantic model in strict mode: no missing or mistyped field."""
    type(model_obj).model_validate(model_obj.model_dump(mode="json"), strict=True)


def uid() -> str:
    return uuid.uuid4().hex[:12]


def anthropic_prompt_tokens(usage) -> int:
    """The whole prompt of an Anthropic answer: `input_tokens` counts only what the cache did not
    serve, the cache's reads and writes are counted apart."""
    return (usage.input_tokens + (usage.cache_read_input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0))


@pytest.fixture()
def admin(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=120) as c:
        yield c


@pytest.fixture()
def api(server):
    """Plain HTTP with the API key, for the routes the SDKs do not have (sessions, feedback)."""
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def make_project(admin, **spec) -> str:
    name = f"sdk-{uid()}"
    r = admin.post("/admin/projects", json={"name": name, **spec})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == name
    return name


# --- Stored completions ----------------------------------------------------------------------


def test_stored_completions_round_trip(client: OpenAI):
    tag = uid()
    sent, made = [], []
    for i in range(3):
        msgs = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say the number {i}."}]
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=msgs, max_tokens=6, temperature=0, store=True,
            metadata={"suite": tag, "n": str(i)})
        validate(raw.text)
        r = raw.parse()
        strict(r)
        sent.append(msgs)
        made.append(r)
    ids = [r.id for r in made]
    assert len(set(ids)) == 3

    # Streamed and stored: retrievable under the chunks' id, with the streamed text.
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=6, temperature=0,
        store=True, metadata={"suite": tag, "n": "3"}, stream=True))
    validate_chunks(chunks)
    streamed_id = chunks[0].id
    assert {c.id for c in chunks} == {streamed_id}
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed_text
    got = client.chat.completions.retrieve(streamed_id)
    assert got.choices[0].message.content == streamed_text
    assert got.metadata == {"suite": tag, "n": "3"}
    ids.append(streamed_id)

    # Not stored: not retrievable.
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=1, metadata={"suite": tag})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(plain.id)

    # Retrieve: what create answered, with its metadata.
    raw = client.chat.completions.with_raw_response.retrieve(ids[1])
    validate(raw.text)
    got = raw.parse()
    strict(got)
    assert got.object == "chat.completion"
    assert got.id == ids[1]
    assert got.model == MODEL
    assert got.choices[0].message.content == made[1].choices[0].message.content
    assert got.choices[0].finish_reason == made[1].choices[0].finish_reason
    assert got.usage.completion_tokens == made[1].usage.completion_tokens
    assert got.metadata == {"suite": tag, "n": "1"}

    # List, filtered by metadata, in both orders; by model.
    raw = client.chat.completions.with_raw_response.list(metadata={"suite": tag}, order="asc")
    validate(raw.text, "ChatCompletionList")
    page = raw.parse()
    assert [c.id for c in page.data] == ids
    assert page.has_more is False
    desc = client.chat.completions.list(metadata={"suite": tag}, order="desc")
    assert [c.id for c in desc.data] == ids[::-1]
    one = client.chat.completions.list(metadata={"suite": tag, "n": "2"})
    assert [c.id for c in one.data] == [ids[2]]
    assert [c.id for c in client.chat.completions.list(metadata={"suite": tag}, model=MODEL)] == ids
    assert client.chat.completions.list(metadata={"suite": tag}, model="no-such-model").data == []

    # Pages: `has_more`, `after`, and the SDK's auto-pagination across them.
    first = client.chat.completions.list(metadata={"suite": tag}, limit=2, order="asc")
    assert [c.id for c in first.data] == ids[:2]
    assert first.has_more is True
    assert first.has_next_page()
    second = client.chat.completions.list(metadata={"suite": tag}, limit=2, order="asc", after=ids[1])
    assert [c.id for c in second.data] == ids[2:]
    assert second.has_more is False
    assert not second.has_next_page()
    assert [c.id for c in first] == ids  # iterating fetches the following pages
    assert [c.id for c in client.chat.completions.list(metadata={"suite": tag}, limit=1,
                                                       order="desc")] == ids[::-1]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.list(limit=0)

    # Update replaces the metadata; filters see the new values, not the old.
    up = client.chat.completions.update(ids[0], metadata={"suite": tag, "team": "red"})
    assert up.id == ids[0]
    assert up.metadata == {"suite": tag, "team": "red"}
    assert client.chat.completions.retrieve(ids[0]).metadata == {"suite": tag, "team": "red"}
    assert [c.id for c in client.chat.completions.list(metadata={"suite": tag, "team": "red"})] == [ids[0]]
    assert client.chat.completions.list(metadata={"suite": tag, "n": "0"}).data == []

    # The request's messages, in order.
    raw = client.chat.completions.messages.with_raw_response.list(ids[2])
    # The spec types every item as an assistant message (`refusal` required, role `assistant`),
    # though its own example, like OpenAI's API, lists the request's user messages: the
    # envelope is checked against the spec, the items against the example's shape.
    body = json.loads(raw.text)
    validate(json.dumps({**body, "data": []}), "ChatCompletionMessageList")
    assert [m["role"] for m in body["data"]] == [m["role"] for m in sent[2]]
    assert (body["first_id"], body["last_id"]) == (body["data"][0]["id"], body["data"][-1]["id"])
    msgs = list(raw.parse())
    assert [m.content for m in msgs] == [m["content"] for m in sent[2]]
    assert all(m.id for m in msgs)
    assert len({m.id for m in msgs}) == len(msgs)
    paged = client.chat.completions.messages.list(ids[2], limit=1)
    assert len(paged.data) == 1 and paged.has_more is True
    assert [m.content for m in paged] == [m["content"] for m in sent[2]]

    # Delete: gone from retrieve, list and messages.
    raw = client.chat.completions.with_raw_response.delete(ids[0])
    validate(raw.text, "ChatCompletionDeleted")
    d = raw.parse()
    assert d.deleted is True and d.id == ids[0] and d.object == "chat.completion.deleted"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.messages.list(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.update(ids[0], metadata={"a": "b"})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.delete(ids[0])
    assert [c.id for c in client.chat.completions.list(metadata={"suite": tag})] == ids[1:]


# --- Projects, templates and sessions --------------------------------------------------------


def test_project_template_and_sessions(client: OpenAI, admin, api):
    name = make_project(admin, default_model=MODEL, sessions=True,
                        system_prompt="You are {{ bot }}, helping {{ customer.name }}."
                                      "{% if vip is defined %} VIP!{% endif %}",
                        params={"temperature": 0, "max_tokens": 8})
    args = {"bot": "Parla", "customer": {"name": "Ada"}}

    # Turn 1 on `{project}`: the project's model answers and a session starts.
    raw = client.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": "My name is Ada."}],
        extra_body={"system_prompt_args": args})
    validate(raw.text)
    r1 = raw.parse()
    strict(r1)
    assert r1.model == MODEL
    assert r1.usage.completion_tokens <= 8  # the project's max_tokens
    session = r1.model_extra["session_id"]
    assert str(uuid.UUID(session)) == session
    completion_1 = r1.choices[0].model_extra["completion_id"]
    assert completion_1
    assert r1.choices[0].message.model_extra["id"].startswith("msg_")
    p1, c1 = r1.usage.prompt_tokens, r1.usage.completion_tokens

    # Turn 2, streamed on `{project}/{model}`: the history is in the prompt, every chunk names
    # the session.
    chunks = list(client.chat.completions.create(
        model=f"{name}/{MODEL}", messages=[{"role": "user", "content": "What is my name?"}],
        stream=True, stream_options={"include_usage": True},
        extra_body={"session_id": session, "system_prompt_args": args}))
    validate_chunks(chunks)
    for c in chunks:
        strict(c)
    assert all(c.model_extra.get("session_id") == session for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.prompt_tokens > p1 + c1, (usage.prompt_tokens, p1, c1)
    answer_2 = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer_2

    # The session as stored.
    h = api.get(f"/v1/sessions/{session}")
    assert h.status_code == 200, h.text
    h = h.json()
    assert h["id"] == session and h["object"] == "session"
    msgs = h["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs] == ["My name is Ada.", r1.choices[0].message.content,
                                            "What is my name?", answer_2]
    assert msgs[1]["completion_id"] == completion_1
    assert all(m["id"].startswith("msg_") for m in msgs)
    assert len({m["id"] for m in msgs}) == 4

    # A longer rendering, more prompt tokens (same messages, a fresh session each).
    counts = []
    for bot in ["A", "A helper with a much longer name than the other one has"]:
        r = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
            extra_body={"system_prompt_args": {"bot": bot, "customer": {"name": "Ada"}}})
        counts.append(r.usage.prompt_tokens)
        assert r.model_extra["session_id"] != session
    assert counts[1] > counts[0] + 5, counts

    # A missing variable is named in the 400.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"system_prompt_args": {"bot": "x"}})
    assert e.value.param == "system_prompt_args"
    assert "`customer`" in e.value.message
    assert "`customer`" in e.value.body["message"]
    # Template arguments for a model without a template.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=1, extra_body={"system_prompt_args": {"a": 1}})
    assert e.value.param == "system_prompt_args"

    # Unknown, malformed and several-choice sessions.
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"session_id": str(uuid.uuid4()), "system_prompt_args": args})
    assert e.value.code == "session_not_found"
    assert e.value.param == "session_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"session_id": "abc", "system_prompt_args": args})
    assert e.value.param == "session_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], n=2,
                                       extra_body={"session_id": session, "system_prompt_args": args})
    assert e.value.param == "n"
    # Projects and models that do not exist.
    for m in [f"nosuch-{uid()}", f"{name}/nosuch"]:
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Hi"}])
        assert e.value.code == "model_not_found"

    # Deleted: gone, and no longer extendable.
    d = api.delete(f"/v1/sessions/{session}")
    assert d.status_code == 200 and d.json()["deleted"] is True
    assert api.get(f"/v1/sessions/{session}").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"session_id": session, "system_prompt_args": args})


def test_explicit_session_on_a_plain_model(client: OpenAI, api):
    made = api.post("/v1/sessions", json={})
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    assert made.json()["object"] == "session"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0, extra_body={"session_id": sid})
    assert r.model_extra["session_id"] == sid
    h = api.get(f"/v1/sessions/{sid}").json()
    assert [(m["role"], m["content"]) for m in h["messages"]] == [
        ("user", "Hi"), ("assistant", r.choices[0].message.content)]
    assert h["messages"][1]["completion_id"] == r.choices[0].model_extra["completion_id"]


# --- Campaigns -------------------------------------------------------------------------------


def test_campaign_is_sticky_and_reports_feedback(client: OpenAI, admin, api):
    key = f"sdk-ab-{uid()}"
    tag = f"tag-{uid()}"
    made = admin.post("/admin/campaigns", json={
        "name": f"Answer length {key}", "key": key, "sticky": "user",
        "variants": [{"name": "short", "weight": 1, "params": {"max_tokens": 1}},
                     {"name": "long", "weight": 1, "params": {"max_tokens": 6}}]})
    assert made.status_code == 201, made.text
    campaign_id = made.json()["id"]
    sizes = {1: "short", 6: "long"}

    def ask(user):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0, user=user,
            messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
            extra_body={"ab_campaign": key, "tags": [tag], "labels": {"suite": "apps-sdk"}})
        validate(raw.text)
        r = raw.parse()
        assert r.usage.completion_tokens in sizes, r.usage
        return sizes[r.usage.completion_tokens], r.choices[0].model_extra["completion_id"]

    first, completions = {}, {"short": [], "long": []}
    for i in range(16):
        user = f"{key}-user-{i}"
        variant, cid = ask(user)
        first[user] = variant
        completions[variant].append(cid)
        if i >= 3 and completions["short"] and completions["long"]:
            break
    assert completions["short"] and completions["long"], first
    # Sticky: the same user gets the same variant every time.
    repeats = 0
    for user, variant in first.items():
        for _ in range(2):
            got, cid = ask(user)
            assert got == variant, f"{user} moved from {variant} to {got}"
            completions[got].append(cid)
            repeats += 1
    requests = {v: len(c) for v, c in completions.items()}
    assert sum(requests.values()) == len(first) + repeats

    # Feedback against a completion of each variant.
    f = api.post("/v1/feedback", json={"completion_id": completions["short"][0], "score": 1,
                                       "label": "accepted"})
    assert f.status_code == 201, f.text
    assert f.json()["variant"] == "short"
    f = api.post("/v1/feedback", json={"completion_id": completions["long"][0], "score": 0,
                                       "label": "rejected"})
    assert f.status_code == 201, f.text
    assert f.json()["variant"] == "long"
    assert api.post("/v1/feedback", json={"completion_id": str(uuid.uuid4()), "score": 1}).status_code == 404
    assert api.post("/v1/feedback", json={"completion_id": completions["short"][0]}).status_code == 400

    # The report: requests, tokens and feedback per variant, by key or by id.
    rep = admin.get(f"/admin/campaigns/{key}/report")
    assert rep.status_code == 200, rep.text
    rep = rep.json()
    assert rep["campaign_id"] == campaign_id
    assert admin.get(f"/admin/campaigns/{campaign_id}/report").json()["variants"] == rep["variants"]
    v = {x["variant"]: x for x in rep["variants"]}
    assert set(v) == {"short", "long"}
    for name, size in [("short", 1), ("long", 6)]:
        assert v[name]["requests"] == requests[name], rep
        assert v[name]["completion_tokens"] == size * requests[name], rep
        assert v[name]["errors"] == 0
        assert v[name]["weight"] == 1
        assert v[name]["feedback"] == 1
    assert v["short"]["avg_score"] == 1.0 and v["short"]["labels"] == {"accepted": 1}
    assert v["long"]["avg_score"] == 0.0 and v["long"]["labels"] == {"rejected": 1}

    # The tags reached the usage records.
    u = admin.get("/admin/usage", params={"tag": tag})
    assert u.status_code == 200, u.text
    assert sum(g["requests"] for g in u.json()["data"]) == sum(requests.values()), u.text

    # A campaign that does not exist.
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=1, extra_body={"ab_campaign": f"nope-{uid()}"})
    assert e.value.code == "campaign_not_found"
    assert e.value.param == "ab_campaign"


# --- Project tools switches ------------------------------------------------------------------


def test_project_tool_switches_are_validated(client: OpenAI, admin):
    name = make_project(admin, default_model=MODEL, tools=[
        {"id": "lookup", "description": "Look a word up",
         "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}])
    ask = dict(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
    # The project's tool is offered (so it is in the prompt); switched off, it is not.
    on = client.chat.completions.create(**ask)
    off = client.chat.completions.create(**ask, extra_body={"use_tools": False})
    off2 = client.chat.completions.create(**ask, extra_body={"tools": [{"id": "lookup", "enabled": False}]})
    assert on.usage.prompt_tokens > off.usage.prompt_tokens, (on.usage, off.usage)
    assert off2.usage.prompt_tokens == off.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask, extra_body={"tools": [{"id": "nope"}]})
    assert e.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=1, extra_body={"tools": [{"id": "lookup"}]})
    assert e.value.param == "tools"


# --- The Anthropic door ----------------------------------------------------------------------


def test_anthropic_sdk_on_a_project(server, admin, api):
    import anthropic
    a = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)
    name = make_project(admin, default_model=MODEL, system_prompt="You are {{ bot }}.")
    greedy = {"temperature": 0}
    tokens = []
    for model, bot in [(name, "A"), (f"{name}/{MODEL}", "A helper with a much longer name than the other one has")]:
        m = a.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "Say hello."}],
                              extra_body={**greedy, "system_prompt_args": {"bot": bot}})
        type(m).model_validate(m.model_dump(mode="json"), strict=True)
        assert m.model == MODEL
        assert m.content[0].type == "text" and m.content[0].text
        assert m.stop_reason in ("end_turn", "max_tokens")
        assert 0 < m.usage.output_tokens <= 8
        tokens.append(anthropic_prompt_tokens(m.usage))
    assert tokens[1] > tokens[0] + 5, tokens

    # Streamed the same.
    with a.messages.stream(model=name, max_tokens=8, messages=[{"role": "user", "content": "Say hello."}],
                           extra_body={**greedy, "system_prompt_args": {"bot": "A"}}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.content[0].text == text
    assert anthropic_prompt_tokens(final.usage) == tokens[0]

    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(model=name, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert "`bot`" in str(e.value)
    with pytest.raises(anthropic.NotFoundError):
        a.messages.create(model=f"{name}/nosuch", max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
                          extra_body={"system_prompt_args": {"bot": "A"}})

    # A session made over HTTP, continued through the Anthropic door.
    made = api.post("/v1/sessions", json={})
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    turns = []
    for words in ["My name is Ada.", "What is my name?"]:
        m = a.messages.create(model=name, max_tokens=6, messages=[{"role": "user", "content": words}],
                              extra_body={**greedy, "session_id": sid, "system_prompt_args": {"bot": "A"}})
        turns.append(m)
    assert anthropic_prompt_tokens(turns[1].usage) > anthropic_prompt_tokens(turns[0].usage) + turns[0].usage.output_tokens
    h = api.get(f"/v1/sessions/{sid}").json()
    assert [(m["role"], m["content"]) for m in h["messages"]] == [
        ("user", "My name is Ada."), ("assistant", turns[0].content[0].text),
        ("user", "What is my name?"), ("assistant", turns[1].content[0].text)]
    with pytest.raises(anthropic.NotFoundError):
        a.messages.create(model=name, max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
                          extra_body={"session_id": str(uuid.uuid4()), "system_prompt_args": {"bot": "A"}})
