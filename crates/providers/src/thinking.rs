//! Reads a local model's thinking out of its text: models whose chat template has a thinking
//! mode (Qwen3, DeepSeek-R1, SmolLM3...) write their reasoning between `<think>` and `</think>`
//! before the answer. The splitter sends what is inside to `reasoning_content` and the rest to
//! `content`, as the text streams, holding back only what may be the start of a tag.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing seen yet: the output may open with `<think>`.
    Before,
    /// Inside the thinking.
    Thinking,
    /// The answer: everything passes through.
    Answer,
}

/// Splits one choice's streamed text into reasoning and answer.
#[derive(Debug, Clone)]
pub(crate) struct ThinkSplitter {
    state: State,
    held: String,
    /// Whether the thought has begun (whitespace right after `<think>` is dropped).
    began: bool,
    /// Whether the answer after a thought has yet to begin (whitespace is dropped).
    trim_answer: bool,
}

/// The longest suffix of `s` that is a proper prefix of `tag`.
fn partial_tag(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ThinkSplitter {
    /// A splitter; `opened` when the prompt itself ends inside `<think>` (templates that open
    /// the thinking for the model).
    pub(crate) fn new(opened: bool) -> Self {
        Self {
            state: if opened {
                State::Thinking
            } else {
                State::Before
            },
            held: String::new(),
            began: false,
            trim_answer: false,
        }
    }

    /// New text in; `(reasoning, answer)` that can be sent now.
    pub(crate) fn push(&mut self, text: &str) -> (String, String) {
        self.held.push_str(text);
        let mut reasoning = String::new();
        let mut answer = String::new();
        loop {
            match self.state {
                State::Before => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.held = rest.to_owned();
                        self.state = State::Thinking;
                    } else if trimmed.is_empty() || OPEN.starts_with(trimmed) {
                        // Nothing yet, or what may be the start of `<think>`.
                        return (reasoning, answer);
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Thinking => {
                    if !self.began {
                        let t = self.held.trim_start();
                        if t.is_empty() {
                            self.held.clear();
                            return (reasoning, answer);
                        }
                        self.held = t.to_owned();
                        self.began = true;
                    }
                    if let Some(i) = self.held.find(CLOSE) {
                        reasoning.push_str(&self.held[..i]);
                        let rest = self.held[i + CLOSE.len()..].to_owned();
                        self.held = rest;
                        self.state = State::Answer;
                        self.trim_answer = true;
                    } else {
                        let keep = partial_tag(&self.held, CLOSE);
                        let cut = self.held.len() - keep;
                        reasoning.push_str(&self.held[..cut]);
                        self.held.drain(..cut);
                        return (reasoning, answer);
                    }
                }
                State::Answer => {
                    // The blank lines a template puts after `</think>` are not the answer.
                    if self.trim_answer {
                        let t = self.held.trim_start();
                        if t.is_empty() {
                            self.held.clear();
                            return (reasoning, answer);
                        }
                        self.held = t.to_owned();
                        self.trim_answer = false;
                    }
                    answer.push_str(&self.held);
                    self.held.clear();
                    return (reasoning, answer);
                }
            }
        }
    }

    /// The end of the output: whatever was held back.
    pub(crate) fn finish(&mut self) -> (String, String) {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Thinking => (held, String::new()),
            State::Before if held.trim().is_empty() => (String::new(), String::new()),
            State::Answer if self.trim_answer => (String::new(), held.trim_start().to_owned()),
            _ => (String::new(), held),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(opened: bool, pieces: &[&str]) -> (String, String) {
        let mut s = ThinkSplitter::new(opened);
        let (mut r, mut a) = (String::new(), String::new());
        for p in pieces {
            let (x, y) = s.push(p);
            r.push_str(&x);
            a.push_str(&y);
        }
        let (x, y) = s.finish();
        (r + &x, a + &y)
    }

    #[test]
    fn thinking_then_answer_with_tags_split_anywhere() {
        let full = "<think>\nIt is 2+2.\n</think>\n\nFour.";
        for cut in 0..full.len() {
            let (a, b) = full.split_at(cut);
            let (r, ans) = run(false, &[a, b]);
            assert_eq!(r, "It is 2+2.\n", "cut at {cut}");
            assert_eq!(ans, "Four.", "cut at {cut}");
        }
        // One character at a time.
        let chars: Vec<String> = full.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(false, &refs), ("It is 2+2.\n".into(), "Four.".into()));
    }

    #[test]
    fn no_thinking_passes_through_and_opened_prompts_start_inside() {
        assert_eq!(
            run(false, &["Hello", " there"]),
            ("".into(), "Hello there".into())
        );
        assert_eq!(
            run(false, &["<thin", "gs>"]),
            ("".into(), "<things>".into())
        );
        assert_eq!(run(true, &["hmm</think>Yes"]), ("hmm".into(), "Yes".into()));
        // Cut off while thinking: all of it is reasoning.
        assert_eq!(
            run(false, &["<think>still going</thi"]),
            ("still going</thi".into(), "".into())
        );
        // An empty thought (thinking turned off by the template) leaves only the answer.
        assert_eq!(
            run(false, &["<think>\n\n</think>\n\nHi"]),
            ("".into(), "Hi".into())
        );
    }
}
