//! Constrained decoding with `llguidance`: a JSON schema (or "any JSON object") compiled once
//! per model and schema into a token matcher, cloned per sequence, that masks every token the
//! grammar cannot accept. Output is valid by construction; a schema that does not compile is an
//! error before any work. `$ref`s resolve only inside the schema: nothing is fetched or read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark dialect (`%json { ... }` embeds a schema).
    Lark(String),
}

/// A compiled constraint, ready to be cloned into each sequence that uses it.
pub struct Grammar(pub(crate) Matcher);

impl Clone for Grammar {
    fn clone(&self) -> Self {
        Grammar(self.0.deep_clone())
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

/// A constraint that cannot be compiled.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// Compiled grammars kept per model, at most this many (then the cache starts over).
const CACHE_LIMIT: usize = 256;

/// The per-model compiler and its cache.
pub(crate) struct Compiler {
    factory: ParserFactory,
    cache: Mutex<HashMap<String, Grammar>>,
}

impl Compiler {
    pub fn new(model: &LlamaModel) -> Result<Self, GrammarError> {
        let env = tok_env(model);
        let factory = ParserFactory::new_simple(&env).map_err(|e| GrammarError(e.to_string()))?;
        Ok(Self {
            factory,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn compile(&self, constraint: &Constraint) -> Result<Grammar, GrammarError> {
        let schema = match constraint {
            Constraint::JsonObject => serde_json::json!({"type": "object"}),
            Constraint::JsonSchema(s) => s.clone(),
            Constraint::Lark(src) => {
                return self.compile_grammar(src.clone(), TopLevelGrammar::from_lark(src.clone()))
            }
        };
        if !schema.is_object() && !schema.is_boolean() {
            return Err(GrammarError("the schema must be a JSON object".into()));
        }
        let key = schema.to_string();
        if let Ok(cache) = self.cache.lock() {
            if let Some(g) = cache.get(&key) {
                return Ok(g.clone());
            }
        }
        let mut schema = schema;
        if let Some(obj) = schema.as_object_mut() {
            // Compact JSON: a small model given free whitespace can spend its budget on it.
            obj.insert(
                "x-guidance".into(),
                serde_json::json!({"whitespace_flexible": false}),
            );
        }
        self.compile_grammar(key, TopLevelGrammar::from_json_schema(schema))
    }

    fn compile_grammar(&self, key: String, top: TopLevelGrammar) -> Result<Grammar, GrammarError> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(g) = cache.get(&key) {
                return Ok(g.clone());
            }
        }
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| GrammarError(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError(e));
        }
        let grammar = Grammar(matcher);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, grammar.clone());
        }
        Ok(grammar)
    }
}

/// The model's vocabulary as llguidance sees it: each token's bytes, control tokens marked with
/// a leading 0xFF so that grammars never produce them as text, end-of-generation tokens as EOS.
fn tok_env(model: &LlamaModel) -> TokEnv {
    let vocab = model.vocab();
    let n = u32::try_from(vocab.n_tokens()).unwrap_or(0);
    let eos = u32::try_from(vocab.eos().0).unwrap_or(0);
    let mut eog = vec![eos];
    let mut words = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = LlamaToken(i32::try_from(i).unwrap_or(0));
        if vocab.is_eog(t) && i != eos {
            eog.push(i);
        }
        let bytes = vocab.token_to_piece(t, false, None);
        if bytes.is_empty() {
            let special = vocab.token_to_piece(t, true, None);
            let mut marked = Vec::with_capacity(special.len() + 1);
            if !special.is_empty() {
                marked.push(0xFF);
                marked.extend(special);
            }
            words.push(marked);
        } else {
            words.push(bytes);
        }
    }
    let info = TokRxInfo::new(n, eos);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
    Arc::new(ApproximateTokEnv::new(trie))
}
