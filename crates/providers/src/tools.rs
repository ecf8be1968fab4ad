//! Tool calling on local models: how tools reach the prompt, the grammar that forces a call
//! (`required` or a named function), and how calls are read back out of the output.
//!
//! Models whose chat template renders `tools` get them through the template. For the others
//! (the default model among them), the tools are described in the system prompt and the model
//! answers a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; earlier calls
//! in the history are rendered the same way, so the conversation reads consistently.

use parlance_api::chat::{Message, Role, Tool, ToolChoice};
use serde_json::{json, Value};

/// Opening tag of a call in the output.
pub const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A call read from the output.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    /// The function.
    pub name: String,
    /// Its arguments, as a JSON string.
    pub arguments: String,
}

/// The messages as the template should see them, with tools described when it cannot render
/// them itself.
pub fn template_messages(
    messages: &[Message],
    tools: &[Tool],
    choice: &ToolChoice,
    template_knows_tools: bool,
) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        let mut v = serde_json::to_value(m).unwrap_or_default();
        if !template_knows_tools {
            if let (Role::Assistant, Some(calls)) = (m.role, m.tool_calls.as_ref()) {
                let mut text = m.content.clone().unwrap_or_default();
                for c in calls.as_array().into_iter().flatten() {
                    let name = c.pointer("/function/name").cloned().unwrap_or(Value::Null);
                    let args = c
                        .pointer("/function/arguments")
                        .and_then(Value::as_str)
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                        .unwrap_or(json!({}));
                    text.push_str(&format!(
                        "{OPEN}{}{CLOSE}",
                        json!({"name": name, "arguments": args})
                    ));
                }
                v["content"] = json!(text);
                if let Some(o) = v.as_object_mut() {
                    o.remove("tool_calls");
                }
            }
        }
        out.push(v);
    }
    if !template_knows_tools && !tools.is_empty() && *choice != ToolChoice::None {
        let listed: Vec<Value> = tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect();
        let prompt = format!(
            "You can call these functions:\n{}\nTo call a function, answer with {OPEN}{{\"name\": <function name>, \"arguments\": <arguments object>}}{CLOSE}.",
            serde_json::to_string(&listed).unwrap_or_default()
        );
        match out.first_mut() {
            Some(first) if first["role"] == "system" || first["role"] == "developer" => {
                let text = first["content"].as_str().unwrap_or("").to_owned();
                first["content"] = json!(format!("{text}\n\n{prompt}"));
            }
            _ => out.insert(0, json!({"role": "system", "content": prompt})),
        }
    }
    out
}

/// The JSON schema of one call to `tool`.
fn call_schema(tool: &Tool) -> Value {
    json!({"type": "object", "additionalProperties": false,
           "required": ["name", "arguments"],
           "properties": {"name": {"const": tool.name}, "arguments": tool.parameters}})
}

/// The schema the output must follow when a call is forced: one call to the named function, or
/// (`required`) an array of calls to any of them, at most one without parallel calls.
pub fn forced_schema(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<Value> {
    match choice {
        ToolChoice::Named(name) => tools.iter().find(|t| &t.name == name).map(call_schema),
        ToolChoice::Required => {
            let any: Vec<Value> = tools.iter().map(call_schema).collect();
            Some(
                json!({"type": "array", "minItems": 1, "maxItems": if parallel { 4 } else { 1 },
                        "items": {"anyOf": any}}),
            )
        }
        ToolChoice::None | ToolChoice::Auto => None,
    }
}

fn call_of(v: &Value, tools: &[Tool]) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?;
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let args = v.get("arguments").cloned().unwrap_or(json!({}));
    let args = match args {
        Value::String(s) => serde_json::from_str::<Value>(&s).ok()?,
        other => other,
    };
    if !args.is_object() {
        return None;
    }
    Some(ParsedCall {
        name: name.to_owned(),
        arguments: args.to_string(),
    })
}

/// The grammar for `auto` when any function is `strict`: either text (which cannot start like a
/// call) or calls whose arguments follow their function's schema.
pub fn auto_grammar(tools: &[Tool], parallel: bool) -> Option<String> {
    if !tools.iter().any(|t| t.strict) {
        return None;
    }
    let any: Vec<Value> = tools.iter().map(call_schema).collect();
    let schema = json!({"anyOf": any, "x-guidance": {"whitespace_flexible": false}});
    let calls = if parallel { "call+" } else { "call" };
    Some(format!(
        "start: text | calls\ntext: TEXT?\nTEXT: /[^<][\\s\\S]*/\ncalls: {calls}\ncall: \"{OPEN}\" %json {schema} \"{CLOSE}\"\n"
    ))
}

/// The calls in a forced output (one object or an array of them).
pub fn parse_forced(text: &str, tools: &[Tool]) -> Vec<ParsedCall> {
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(Value::Array(items)) => items.iter().filter_map(|v| call_of(v, tools)).collect(),
        Ok(v) => call_of(&v, tools).into_iter().collect(),
        Err(_) => Vec::new(),
    }
}

/// The calls in a forced output cut short by `max_tokens`: the complete ones, then the last as
/// far as it got, its arguments an unfinished JSON string (as OpenAI answers a call cut by
/// `length`). The grammar writes `name` before `arguments`, so a call whose name is complete is
/// reported even when none of its arguments are; with a function forced by name (`named`), that
/// call is reported however early the output was cut.
pub fn parse_truncated(text: &str, tools: &[Tool], named: Option<&str>) -> Vec<ParsedCall> {
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("\"name\"") {
        let Some(after) = rest[at + 6..].trim_start().strip_prefix(':') else {
            break;
        };
        let after = after.trim_start();
        let mut names = serde_json::Deserializer::from_str(after).into_iter::<String>();
        let Some(Ok(name)) = names.next() else {
            break;
        };
        let after = &after[names.byte_offset()..];
        let args = after.find("\"arguments\"").and_then(|a| {
            after[a + 11..]
                .trim_start()
                .strip_prefix(':')
                .map(str::trim_start)
        });
        // The arguments, and where the next call may start when they were complete.
        let (arguments, next) = match args {
            None => (String::new(), None),
            Some(args) => {
                let mut values = serde_json::Deserializer::from_str(args).into_iter::<Value>();
                match values.next() {
                    Some(Ok(v)) => (v.to_string(), Some(&args[values.byte_offset()..])),
                    _ => (args.to_owned(), None),
                }
            }
        };
        if tools.iter().any(|t| t.name == name) {
            calls.push(ParsedCall { name, arguments });
        }
        match next {
            Some(next) => rest = next,
            None => break,
        }
    }
    match named {
        Some(name) if calls.is_empty() => vec![ParsedCall {
            name: name.to_owned(),
            arguments: String::new(),
        }],
        _ => calls,
    }
}

/// The calls in a free (`auto`) output: every `<tool_call>` block that parses and names a
/// known function. Empty when the model answered in text.
pub fn parse_auto(text: &str, tools: &[Tool]) -> Vec<ParsedCall> {
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        if let Ok(v) = serde_json::from_str::<Value>(body.trim()) {
            calls.extend(call_of(&v, tools));
        }
        rest = next;
    }
    calls
}

/// Whether free output that so far reads `text` may still turn out to be a call.
pub fn may_be_call(text: &str) -> bool {
    let t = text.trim_start();
    t.starts_with(OPEN) || OPEN.starts_with(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        vec![Tool {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            strict: true,
        }]
    }

    #[test]
    fn forced_calls_cut_short_keep_their_name_and_partial_arguments() {
        let t = tools();
        let cut = "{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Rom";
        assert_eq!(
            parse_truncated(cut, &t, None),
            vec![ParsedCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Rom".into()
            }]
        );
        // Cut before the arguments began: the call, with empty arguments.
        assert_eq!(
            parse_truncated("{\"name\": \"get_weather\", \"argu", &t, None),
            vec![ParsedCall {
                name: "get_weather".into(),
                arguments: String::new()
            }]
        );
        // `required` with parallel calls: the complete first call, then the cut second.
        let two = "[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Rome\"}},{\"name\":\"get_weather\",\"arguments\":{\"ci";
        let calls = parse_truncated(two, &t, None);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, "{\"city\":\"Rome\"}");
        assert_eq!(calls[1].arguments, "{\"ci");
        // Cut inside the name, or naming no known function: no call.
        assert!(parse_truncated("{\"name\":\"get_wea", &t, None).is_empty());
        assert!(parse_truncated("{\"name\":\"other\",\"arguments\":{", &t, None).is_empty());
        // Unless the function was forced by name: then it is the call, whatever was cut.
        assert_eq!(
            parse_truncated("{\"name\":\"get_wea", &t, Some("get_weather")),
            vec![ParsedCall {
                name: "get_weather".into(),
                arguments: String::new()
            }]
        );
    }

    #[test]
    fn auto_output_parsing() {
        let t = tools();
        let out = "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>";
        assert_eq!(
            parse_auto(out, &t),
            vec![ParsedCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into()
            }]
        );
        assert!(parse_auto("It is sunny.", &t).is_empty());
        assert!(parse_auto(
            "<tool_call>{\"name\": \"other\", \"arguments\": {}}</tool_call>",
            &t
        )
        .is_empty());
        assert!(may_be_call("  <tool_") && may_be_call("<tool_call>{") && !may_be_call("Hello"));
    }

    #[test]
    fn forced_output_parsing_and_schema() {
        let t = tools();
        let one = "{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}";
        assert_eq!(parse_forced(one, &t).len(), 1);
        assert_eq!(parse_forced(&format!("[{one},{one}]"), &t).len(), 2);
        let s = forced_schema(&t, &ToolChoice::Required, false).unwrap_or_default();
        assert_eq!(s["maxItems"], 1);
        assert!(forced_schema(&t, &ToolChoice::Auto, true).is_none());
        assert_eq!(
            forced_schema(&t, &ToolChoice::Named("get_weather".into()), true).unwrap_or_default()
                ["properties"]["name"]["const"],
            "get_weather"
        );
    }

    #[test]
    fn history_and_tool_prompt_for_templates_without_tools() {
        let messages = vec![
            Message {
                role: Role::User,
                content: Some("Weather?".into()),
                name: None,
                tool_calls: None,
                tool_call_id: None,
                completion_id: None,
                metadata: None,
            },
            Message {
                role: Role::Assistant,
                content: None,
                name: None,
                tool_calls: Some(
                    json!([{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]),
                ),
                tool_call_id: None,
                completion_id: None,
                metadata: None,
            },
            Message {
                role: Role::Tool,
                content: Some("sunny".into()),
                name: None,
                tool_calls: None,
                tool_call_id: Some("c1".into()),
                completion_id: None,
                metadata: None,
            },
        ];
        let out = template_messages(&messages, &tools(), &ToolChoice::Auto, false);
        assert_eq!(out[0]["role"], "system");
        assert!(out[0]["content"]
            .as_str()
            .unwrap_or("")
            .contains("get_weather"));
        let rendered = out[2]["content"].as_str().unwrap_or("");
        assert!(
            rendered.starts_with("<tool_call>{") && rendered.ends_with("}</tool_call>"),
            "{rendered}"
        );
        assert!(
            rendered.contains("\"name\":\"get_weather\"")
                && rendered.contains("{\"city\":\"Rome\"}"),
            "{rendered}"
        );
        assert_eq!(out[3]["role"], "tool");
        let none = template_messages(&messages, &tools(), &ToolChoice::None, false);
        assert_eq!(none[0]["role"], "user");
    }
}
