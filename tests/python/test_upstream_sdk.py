"""Both official SDKs against parlance in front of upstream providers (the mock upstream):
answers from an OpenAI-compatible upstream (after a fall-back) and from an Anthropic upstream,
through both doors, streamed and not, tools included, parsed strictly."""

import json

import anthropic
from openai import OpenAI

from test_openai_sdk import strict, validate


def sdk(gateway):
    return OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)


def test_openai_sdk_through_a_fall_back(gateway):
    c = sdk(gateway)
    raw = c.chat.completions.with_raw_response.create(
        model="gpt", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    validate(raw.text)
    r = raw.parse()
    strict(r)
    assert r.choices[0].message.content == "Hello from upstream"
    assert r.usage.prompt_tokens == 11 and r.usage.prompt_tokens_details.cached_tokens == 2
    text = ""
    for chunk in c.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=20, stream=True,
                                           stream_options={"include_usage": True}):
        strict(chunk)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == "Hello from upstream"


def test_openai_sdk_stream_helper_assembles_upstream_tool_calls(gateway):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    for model, city in (("gpt-tools", "Paris"), ("claude-tools", "Lyon")):
        with sdk(gateway).chat.completions.stream(
                model=model, messages=[{"role": "user", "content": "Weather?"}], tools=tools,
                max_tokens=50) as s:
            final = s.get_final_completion()
        strict(final)
        call = final.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": city}
        assert final.choices[0].finish_reason == "tool_calls"


def test_anthropic_sdk_on_both_kinds_of_upstream(gateway):
    a = anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0)
    m = a.messages.create(model="claude", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].text == "Bonjour from Claude"
    # Anthropic counts cached prompt tokens apart from the rest, as the upstream did.
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens) == (9, 2)
    m = a.messages.create(model="gpt", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].text == "Hello from upstream"
    with a.messages.stream(model="claude-tools", max_tokens=50,
                           tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
                           messages=[{"role": "user", "content": "Weather?"}]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    block = [b for b in final.content if b.type == "tool_use"][0]
    assert block.input == {"city": "Lyon"}


def test_reasoning_with_both_sdks(gateway):
    r = sdk(gateway).chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "hi"}], reasoning_effort="high")
    strict(r)
    assert r.choices[0].message.content == "Hi!"
    assert r.choices[0].message.model_extra["reasoning_content"] == "The user greets me."
    assert r.usage.completion_tokens_details.reasoning_tokens == 7
    a = anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0)
    with a.messages.stream(model="thinker", max_tokens=50,
                           messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "The user greets me."
    assert final.content[1].text == "Hi!"


def test_legacy_functions_through_an_upstream(gateway):
    """`functions` reach the upstream as tools; its call comes back in the legacy shape."""
    functions = [{"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    c = sdk(gateway)
    for model, city in (("gpt-tools", "Paris"), ("claude-tools", "Lyon")):
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Weather?"}], functions=functions,
            max_tokens=50)
        validate(raw.text)
        r = raw.parse()
        strict(r)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "function_call"
        assert m.tool_calls is None and m.function_call.name == "get_weather"
        assert json.loads(m.function_call.arguments) == {"city": city}
        name, args, finish = "", "", None
        for chunk in c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Weather?"}], functions=functions,
                max_tokens=50, stream=True):
            strict(chunk)
            for ch in chunk.choices:
                assert ch.delta.tool_calls is None
                if ch.delta.function_call:
                    name += ch.delta.function_call.name or ""
                    args += ch.delta.function_call.arguments or ""
                finish = ch.finish_reason or finish
        assert (name, json.loads(args), finish) == ("get_weather", {"city": city}, "function_call")
