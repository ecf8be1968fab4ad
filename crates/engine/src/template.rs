//! Chat templates: the model's own Jinja template (from its GGUF metadata) rendered with
//! `minijinja` and Python-compatible string and dict methods, as Hugging Face renders it.

use minijinja::{Environment, Error, ErrorKind, Value};

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    knows_developer_role: bool,
    knows_tools: bool,
    knows_thinking: bool,
    bos_token: String,
    eos_token: String,
}

/// A template that failed to compile or to render.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl From<Error> for TemplateError {
    fn from(e: Error) -> Self {
        // The template's own `raise_exception` messages are the useful part for the caller.
        match e.kind() {
            ErrorKind::InvalidOperation => TemplateError(e.detail().unwrap_or("").to_owned()),
            _ => TemplateError(e.to_string()),
        }
    }
}

/// ChatML, used when a model file carries no template of its own.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts templates may refer to.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // Hugging Face renders chat templates with these two settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_owned())?;
        Ok(Self {
            env,
            knows_developer_role: source.contains("developer"),
            knows_tools: source.contains("tools"),
            knows_thinking: source.contains("<think>") || source.contains("enable_thinking"),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Whether the template has a thinking mode (`<think>`, `enable_thinking`).
    pub fn knows_thinking(&self) -> bool {
        self.knows_thinking
    }

    /// Whether the template renders `tools` itself.
    pub fn knows_tools(&self) -> bool {
        self.knows_tools
    }

    /// Renders the conversation. `messages` are OpenAI-shaped objects (`role`, `content` as a
    /// string, optional `name`, `tool_calls`, `tool_call_id`); `tools` are OpenAI tool
    /// definitions, passed to templates that know them.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String, TemplateError> {
        let messages: Vec<serde_json::Value> =
            messages.iter().map(|m| self.normalise_message(m)).collect();
        let tmpl = self.env.get_template("chat")?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(&messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            enable_thinking => enable_thinking,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        Ok(tmpl.render(ctx)?)
    }

    fn normalise_message(&self, m: &serde_json::Value) -> serde_json::Value {
        let mut m = m.clone();
        if let Some(obj) = m.as_object_mut() {
            if !self.knows_developer_role
                && obj.get("role").and_then(|r| r.as_str()) == Some("developer")
            {
                obj.insert("role".into(), "system".into());
            }
            // Templates concatenate `content`; an absent one (an assistant turn that only calls
            // tools) renders as empty text rather than failing.
            if obj.get("content").is_none_or(serde_json::Value::is_null) {
                obj.insert("content".into(), "".into());
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    // Shaped like Llama 3's: bos token, header ids, and a trimmed content via a Python method.
    const LLAMA3_LIKE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    // Shaped like Gemma's: no system role, so the first user turn absorbs it; raise_exception on
    // bad alternation; `.strip()` as a Python method.
    const GEMMA_LIKE: &str = "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}{% for message in msgs %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + message['content'].strip() + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

    #[test]
    fn thinking_switch_reaches_the_template() {
        // Shaped like Qwen3's: thinking on unless `enable_thinking` is false, when the
        // generation prompt closes an empty thought.
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert!(t.knows_thinking());
        let msgs = vec![json!({"role": "user", "content": "Hi"})];
        let on = t.render(&msgs, None, true, true).unwrap();
        let off = t.render(&msgs, None, true, false).unwrap();
        assert!(on.ends_with("<|im_start|>assistant\n"));
        assert!(off.ends_with("<think>\n\n</think>\n\n"));
        assert!(!ChatTemplate::new(SMOLLM2, "", "").unwrap().knows_thinking());
    }

    fn render(src: &str, msgs: serde_json::Value) -> Result<String, TemplateError> {
        let t = ChatTemplate::new(src, "<s>", "</s>")?;
        let msgs = msgs.as_array().cloned().unwrap_or_default();
        t.render(&msgs, None, true, true)
    }

    #[test]
    fn table_of_real_template_shapes() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            (
                SMOLLM2,
                json!([{"role": "user", "content": "Hi"}]),
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                SMOLLM2,
                json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                SMOLLM2,
                json!([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                SMOLLM2,
                json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                LLAMA3_LIKE,
                json!([{"role": "user", "content": "  Hi  "}]),
                "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            (
                GEMMA_LIKE,
                json!([{"role": "system", "content": "S"}, {"role": "user", "content": " Q "}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]),
                "<start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n",
            ),
            (
                CHATML,
                json!([{"role": "assistant", "content": null, "tool_calls": []}, {"role": "user", "content": "x"}]),
                "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n",
            ),
        ];
        for (i, (src, msgs, want)) in cases.into_iter().enumerate() {
            let got = render(src, msgs).unwrap_or_else(|e| format!("error: {e}"));
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn raise_exception_surfaces_the_templates_message() {
        let err = render(GEMMA_LIKE, json!([{"role": "assistant", "content": "A"}]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("must alternate"), "{err}");
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
