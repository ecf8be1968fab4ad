//! Property test on the real default model: a random JSON schema either fails to compile (the
//! server's 400) or constrains generation so that every output that ends naturally parses and
//! validates against it. Never a finished output that breaks its schema.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::sync::OnceLock;

use parlance_engine::{
    Constraint, Engine, EngineConfig, Event, FinishReason, Generation, SamplingParams,
};
use proptest::prelude::*;
use serde_json::{json, Value};

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let path = common::model_path();
        let config = EngineConfig {
            max_sequences: Some(2),
            context_length: Some(512),
            ..EngineConfig::default()
        };
        Engine::load(&path, &config).expect("load model")
    })
}

/// Schemas from a subset whose validation is written out below; some are deliberately broken.
fn schema() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        (0i64..50, 0i64..50).prop_map(
            |(a, b)| json!({"type": "integer", "minimum": a.min(b), "maximum": a.max(b)})
        ),
        Just(json!({"type": "boolean"})),
        (1u32..12).prop_map(|n| json!({"type": "string", "maxLength": n})),
        proptest::collection::vec("[a-z]{1,6}", 1..4).prop_map(|v| json!({"enum": v})),
        Just(json!({"type": "bogus"})),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            (inner.clone(), 1u32..4).prop_map(|(items, n)| json!({"type": "array", "items": items, "maxItems": n})),
            proptest::collection::vec(("[a-z]{1,5}", inner), 1..3).prop_map(|props| {
                let mut properties = serde_json::Map::new();
                for (k, v) in props {
                    properties.insert(k, v);
                }
                let required: Vec<Value> = properties.keys().map(|k| json!(k)).collect();
                json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
            }),
        ]
    })
}

/// Validates `v` against a schema of the subset above.
fn valid(schema: &Value, v: &Value) -> bool {
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return options.contains(v);
    }
    match schema["type"].as_str() {
        Some("integer") => v.as_i64().is_some_and(|n| {
            n >= schema["minimum"].as_i64().unwrap_or(i64::MIN)
                && n <= schema["maximum"].as_i64().unwrap_or(i64::MAX)
        }),
        Some("boolean") => v.is_boolean(),
        Some("string") => v.as_str().is_some_and(|s| {
            s.chars().count() as u64 <= schema["maxLength"].as_u64().unwrap_or(u64::MAX)
        }),
        Some("array") => v.as_array().is_some_and(|a| {
            a.len() as u64 <= schema["maxItems"].as_u64().unwrap_or(u64::MAX)
                && a.iter().all(|x| valid(&schema["items"], x))
        }),
        Some("object") => v.as_object().is_some_and(|o| {
            let props = schema["properties"].as_object().unwrap();
            o.len() == props.len()
                && props
                    .iter()
                    .all(|(k, s)| o.get(k).is_some_and(|x| valid(s, x)))
        }),
        _ => false,
    }
}

fn generate(grammar: parlance_engine::Grammar, seed: u64) -> (String, FinishReason) {
    let e = engine();
    let prompt = e
        .apply_chat_template(
            &[json!({"role": "user", "content": "Answer in JSON."})],
            None,
            true,
        )
        .unwrap();
    let mut stream = e
        .submit(Generation {
            prompt: e.tokenize(&prompt),
            n: 1,
            max_tokens: Some(120),
            sampling: SamplingParams {
                seed: Some(seed),
                ..SamplingParams::default()
            },
            stop: vec![],
            ignore_eos: false,
            logprobs: None,
            grammar: Some(grammar),
            think_budget: None,
        })
        .unwrap();
    let mut text = String::new();
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Finished { reason, .. } => return (text, reason),
            Event::Failed { message } => panic!("{message}"),
            Event::Admitted { .. } => {}
        }
    }
    panic!("stream ended without finishing");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn schemas_compile_and_constrain_or_are_refused(schema in schema(), seed in 0u64..1000) {
        match engine().compile(&Constraint::JsonSchema(schema.clone())) {
            Err(_) => {
                // Refused: the server answers 400. A schema of the valid subset must not be refused.
                prop_assert!(schema.to_string().contains("bogus"), "valid schema refused: {schema}");
            }
            Ok(grammar) => {
                prop_assert!(!schema.to_string().contains("bogus"), "broken schema accepted: {schema}");
                let (text, reason) = generate(grammar, seed);
                if reason == FinishReason::Stop {
                    let v: Value = serde_json::from_str(&text)
                        .map_err(|e| TestCaseError::fail(format!("{e}: {text} for {schema}")))?;
                    prop_assert!(valid(&schema, &v), "{text} does not match {schema}");
                }
            }
        }
    }
}
