"""The official `openai` SDK against parlance, with strict response validation: every
response is parsed into the SDK's models and checked field by field, and raw payloads are
validated against OpenAI's published spec."""

import json
import pathlib
import subprocess
import sys

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import ADMIN_TOKEN, MODEL, ROOT

VALIDATOR = ROOT.parent / "shared" / "tools" / "validate_schema.py"


def validate(payload: str):
    r = subprocess.run([sys.executable, str(VALIDATOR), "-"], input=payload, text=True,
                       capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr


def strict(model_obj):
    """Round-trip through the SDK's pydantic model in strict mode: no missing or mistyped field."""
    type(model_obj).model_validate(model_obj.model_dump(mode="json"), strict=True)


def test_create_plain(client: OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=10, temperature=0)
    strict(r)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert r.system_fingerprint.startswith("fp_")


def test_raw_response_matches_spec(client: OpenAI):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, n=2, seed=1)
    validate(raw.text)
    assert raw.headers.get("x-request-id")


def test_stream_accumulates_and_matches_plain(client: OpenAI):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=20, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    text, finish, usage, ids = "", None, None, set()
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        strict(chunk)
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        d = chunk.choices[0]
        text += d.delta.content or ""
        finish = d.finish_reason or finish
    assert text == plain
    assert finish == "length"
    assert usage.completion_tokens == 20
    assert len(ids) == 1


def test_stream_helper(client: OpenAI):
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                        max_tokens=200, temperature=0) as s:
        deltas = [e.delta for e in s if e.type == "content.delta"]
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "".join(deltas)


def test_stream_raw_matches_spec(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-sdk-test"}, timeout=120)
    assert r.headers["content-type"].startswith("text/event-stream")
    validate(r.text)


def test_seed_reproducible(client: OpenAI):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=12,
              temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_errors_raise_the_right_exceptions(client: OpenAI, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 3000}])
    assert e.value.code == "context_length_exceeded"
    bad = OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_models(client: OpenAI):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert MODEL in ids
    m = client.models.retrieve(MODEL)
    strict(m)
    assert m.model_extra.get("context_length") == 2048


def test_logprobs(client: OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    strict(r)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    assert "".join(t.token for t in lp) == r.choices[0].message.content
    text = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0, logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            text += "".join(t.token for t in chunk.choices[0].logprobs.content)
    assert text == r.choices[0].message.content


def test_anthropic_sdk(server):
    import anthropic
    c = anthropic.Anthropic(base_url=server, api_key="sk-sdk-test", max_retries=0)
    # This SDK no longer takes sampling fields as arguments; greedy through extra_body.
    greedy = {"temperature": 0}
    m = c.messages.create(model=MODEL, max_tokens=10, system="Be brief.", extra_body=greedy,
                          messages=[{"role": "user", "content": "Say hello."}])
    type(m).model_validate(m.model_dump(mode="json"), strict=True)
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0
    with c.messages.stream(model=MODEL, max_tokens=10, system="Be brief.", extra_body=greedy,
                           messages=[{"role": "user", "content": "Say hello."}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text == final.content[0].text
    assert final.stop_reason == m.stop_reason
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    bad = anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_structured_output_parse(client: OpenAI):
    from typing import Literal
    from pydantic import BaseModel, Field

    # The bounds are part of what is tested (the grammar enforces them), and they keep every
    # sampled answer finite: with an unbounded `age` the 135M model may write digits until
    # `max_tokens` (seed 0 does on some CPUs), which the SDK reports as LengthFinishReasonError.
    class Pet(BaseModel):
        name: str = Field(max_length=20)
        kind: Literal["cat", "dog", "fish"]
        age: int = Field(ge=0, le=100)

    for seed in range(5):
        r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}],
                                          response_format=Pet, max_tokens=120, seed=seed)
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet), r.choices[0].message.content


def test_tool_calls_with_the_sdk(client: OpenAI):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"], "additionalProperties": False}, "strict": True}}]
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    # (With seed 2 the 135M model spells a 60-token city name and is cut off by max_tokens.)
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice="required",
                                       max_tokens=60, seed=1)
    strict(r)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    # Accumulate streamed fragments the way agent loops do.
    acc = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice="required",
                                                max_tokens=60, seed=1, stream=True):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            e = acc.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            e["name"] += tc.function.name or ""
            e["arguments"] += tc.function.arguments or ""
    assert acc[0]["name"] == call.function.name
    assert json.loads(acc[0]["arguments"]) == json.loads(call.function.arguments)
    # The call and its result go back in the history; the model answers in text.
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice="none", max_tokens=20, seed=1)
    assert r2.choices[0].message.content


def test_anthropic_sdk_tool_use(server):
    import anthropic
    c = anthropic.Anthropic(base_url=server, api_key="sk-sdk-test", max_retries=0)
    # Without additionalProperties false the schema lets a small model add keys until max_tokens
    # (it does, greedily, with some KV cache types), and then the answer is text, not a tool use.
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                               "required": ["city"], "additionalProperties": False}}]
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    one = {"type": "any", "disable_parallel_tool_use": True}
    greedy = {"temperature": 0}  # greedy, so the plain and streamed calls are the same
    m = c.messages.create(model=MODEL, max_tokens=120, tools=tools, tool_choice=one, messages=msgs,
                          extra_body=greedy)
    type(m).model_validate(m.model_dump(mode="json"), strict=True)
    assert m.stop_reason == "tool_use"
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather" and "city" in use.input
    with c.messages.stream(model=MODEL, max_tokens=120, tools=tools, tool_choice=one, messages=msgs,
                           extra_body=greedy) as s:
        final = s.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert streamed.name == use.name and streamed.input == use.input
    msgs += [{"role": "assistant", "content": m.content},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]}]
    r = c.messages.create(model=MODEL, max_tokens=20, tools=tools, tool_choice={"type": "none"}, messages=msgs)
    assert r.content[0].type == "text"


def test_managed_key_rate_limit_is_the_sdks_rate_limit_error(server):
    """A managed key from the admin API works with the SDK; over its limit the SDK raises its
    own RateLimitError and can read OpenAI's rate-limit headers."""
    admin = httpx.Client(base_url=server, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert admin.post("/admin/accounts", json={"name": "sdk"}).status_code == 201
    made = admin.post("/admin/keys", json={"account": "sdk", "rpm": 1})
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    client = OpenAI(base_url=server + "/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert raw.parse().usage.total_tokens > 0
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 429
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1
    # The Anthropic SDK maps the same refusal to its RateLimitError.
    import anthropic
    a = anthropic.Anthropic(base_url=server, api_key=key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError):
        a.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    # The usage shows up in the admin API.
    usage = admin.get("/admin/usage", params={"account": "sdk", "group_by": "status"}).json()
    by_status = {g["group"]: g["requests"] for g in usage["data"]}
    assert by_status == {"200": 1, "429": 2}, usage


def test_legacy_functions_with_the_sdk(client: OpenAI, server):
    """The deprecated `functions` / `function_call` fields, answered in their own shape."""
    functions = [{"name": "get_weather", "description": "Weather in a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"], "additionalProperties": False}}]
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    # Greedy: a sampled city name may run past any max_tokens (that case is checked below).
    r = client.chat.completions.create(model=MODEL, messages=msgs, functions=functions,
                                       function_call={"name": "get_weather"}, max_tokens=60,
                                       temperature=0)
    strict(r)
    choice = r.choices[0]
    # A forced (named) call ends with "stop", as OpenAI answers it; a call the model chose
    # ends with "function_call" (test_upstream_sdk.py, where the upstream always calls).
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None and choice.message.content is None
    fc = choice.message.function_call
    assert fc.name == "get_weather" and "city" in json.loads(fc.arguments)
    # The raw body is valid against OpenAI's published spec.
    raw = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": "Bearer sk-sdk-test"},
                     json={"model": MODEL, "messages": msgs, "functions": functions,
                           "function_call": {"name": "get_weather"}, "max_tokens": 60,
                           "temperature": 0}, timeout=60)
    assert raw.status_code == 200, raw.text
    validate(raw.text)
    assert "tool_calls" not in raw.json()["choices"][0]["message"]
    # Streamed in the legacy delta shape: the name first, then argument fragments.
    name, args, finish = "", "", None
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, functions=functions,
                                                function_call={"name": "get_weather"}, max_tokens=60,
                                                temperature=0, stream=True):
        strict(chunk)
        for c in chunk.choices:
            assert c.delta.tool_calls is None
            if c.delta.function_call:
                name += c.delta.function_call.name or ""
                args += c.delta.function_call.arguments or ""
            finish = c.finish_reason or finish
    assert (name, json.loads(args), finish) == (fc.name, json.loads(fc.arguments), "stop")
    # Cut short by max_tokens, a forced call is still a call (its arguments as far as they got,
    # finish_reason "length"), never the call's JSON as text.
    cut = client.chat.completions.create(model=MODEL, messages=msgs, functions=functions,
                                         function_call={"name": "get_weather"}, max_tokens=6,
                                         temperature=0)
    strict(cut)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content is None
    assert cut.choices[0].message.function_call.name == "get_weather"
    assert fc.arguments.startswith(cut.choices[0].message.function_call.arguments)
    # The call and the function's answer go back in the legacy history shape.
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "function", "name": "get_weather", "content": "Sunny, 24 degrees"}]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, functions=functions,
                                        function_call="none", max_tokens=20, seed=1)
    assert r2.choices[0].message.content and r2.choices[0].message.function_call is None
    assert r2.choices[0].finish_reason in ("stop", "length")
    # As strict as tools: both forms at once, an unknown name, a call without functions.
    tools = [{"type": "function", "function": functions[0]}]
    for kwargs, param in [
        ({"functions": functions, "tools": tools}, "functions"),
        ({"functions": functions, "function_call": {"name": "nope"}}, "function_call"),
        ({"function_call": "auto"}, "function_call"),
        ({"functions": functions, "tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"description": "no name"}]}, "functions[0].name"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=5, **kwargs)
        assert e.value.param == param, (kwargs, e.value.body)
