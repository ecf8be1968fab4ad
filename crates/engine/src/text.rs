//! Turning a stream of token bytes into client text: whole UTF-8 characters only, with stop
//! strings matched across token boundaries and never sent.
//!
//! Flow: each sampled token's bytes go into [`Utf8Decoder`], which releases only complete
//! characters. The released text goes into [`StopMatcher`], which holds back any tail that could
//! still be the start of a stop string and reports a match as soon as one is complete. What it
//! releases is safe to send to the client.

/// Accumulates bytes and releases the longest prefix that is complete UTF-8.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Adds bytes and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe split: `valid` bytes are known to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never become UTF-8: replace them, carry on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is still pending is released, with replacement characters for
    /// an incomplete sequence.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// What the stop matcher decided for one piece of text.
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to send now.
    pub text: String,
    /// True when a stop string was found: `text` ends just before it, and generation must end.
    pub stopped: bool,
    /// Which stop string matched (its index in the list the matcher was made from).
    pub matched: Option<usize>,
}

/// Finds stop strings in generated text, across any split of that text into pieces.
#[derive(Debug)]
pub struct StopMatcher {
    /// Non-empty stop strings with their index in the caller's list.
    stops: Vec<(usize, String)>,
    held: String,
    longest: usize,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<(usize, String)> = stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .map(|(i, s)| (i, s.clone()))
            .collect();
        let longest = stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        Self {
            stops,
            held: String::new(),
            longest,
        }
    }

    /// Adds generated text; returns what may be sent and whether a stop string completed.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome {
                text: text.to_owned(),
                stopped: false,
                matched: None,
            };
        }
        self.held.push_str(text);
        // The earliest complete match wins, whichever stop string it is.
        let earliest = self
            .stops
            .iter()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, *i)))
            .min();
        if let Some((at, i)) = earliest {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return StopOutcome {
                text: out,
                stopped: true,
                matched: Some(i),
            };
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let keep = self.partial_suffix_len();
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopOutcome {
            text: out,
            stopped: false,
            matched: None,
        }
    }

    /// Ends the stream without a match: the held-back text is released.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn partial_suffix_len(&self) -> usize {
        let max = self.longest.saturating_sub(1).min(self.held.len());
        for len in (1..=max).rev() {
            let start = self.held.len() - len;
            if !self.held.is_char_boundary(start) {
                continue;
            }
            let tail = &self.held[start..];
            if self.stops.iter().any(|(_, s)| s.starts_with(tail)) {
                return len;
            }
        }
        0
    }
}

/// Items (token log probabilities) that follow the text they belong to: each is released once
/// all of its token's bytes have been sent, so a chunk carries exactly the tokens of its text.
#[derive(Debug)]
pub struct AlignedQueue<T> {
    items: std::collections::VecDeque<(usize, T)>,
    credit: usize,
}

impl<T> Default for AlignedQueue<T> {
    fn default() -> Self {
        Self {
            items: std::collections::VecDeque::new(),
            credit: 0,
        }
    }
}

impl<T> AlignedQueue<T> {
    /// Adds the item of a token whose text is `len` bytes long.
    pub fn push(&mut self, len: usize, item: T) {
        self.items.push_back((len, item));
    }

    /// `bytes` more bytes of text were sent: returns the items now wholly covered.
    pub fn release(&mut self, bytes: usize) -> Vec<T> {
        self.credit += bytes;
        let mut out = Vec::new();
        while let Some((len, _)) = self.items.front() {
            if *len > self.credit {
                break;
            }
            self.credit -= *len;
            if let Some((_, item)) = self.items.pop_front() {
                out.push(item);
            }
        }
        out
    }

    /// The text was cut (a stop string matched): a token partly sent is released, the rest
    /// (whose text was never sent) are dropped.
    pub fn cut(&mut self) -> Vec<T> {
        let partial = self.credit > 0;
        self.credit = 0;
        let first = self.items.pop_front().filter(|_| partial);
        self.items.clear();
        first.map(|(_, item)| item).into_iter().collect()
    }

    /// The stream ended without a cut: everything left is released.
    pub fn drain(&mut self) -> Vec<T> {
        self.credit = 0;
        self.items.drain(..).map(|(_, item)| item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_spanning_tokens_is_cut_and_not_sent() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn partial_prefix_released_when_it_diverges() {
        assert_eq!(run(&["END"], &["a E", "Nx"]), ("a ENx".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
        let mut m = StopMatcher::new(&["".into(), "cd".into(), "b".into()]);
        assert_eq!(m.push("abcd").matched, Some(2));
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn multibyte_stop_string() {
        assert_eq!(run(&["é!"], &["caf", "é", "!x"]), ("caf".into(), true));
    }

    #[test]
    fn utf8_never_split() {
        let mut d = Utf8Decoder::default();
        let bytes = "日本".as_bytes();
        assert_eq!(d.push(&bytes[..1]), "");
        assert_eq!(d.push(&bytes[1..4]), "日");
        assert_eq!(d.push(&bytes[4..]), "本");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement() {
        let mut d = Utf8Decoder::default();
        assert_eq!(d.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        assert_eq!(d.push(&[0xe6]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    #[test]
    fn aligned_queue_follows_sent_bytes() {
        let mut q = AlignedQueue::default();
        q.push(2, 'a');
        q.push(3, 'b');
        q.push(1, 'c');
        assert_eq!(q.release(1), vec![]);
        assert_eq!(q.release(2), vec!['a']);
        assert_eq!(q.release(2), vec!['b']);
        q.push(0, 'd');
        assert_eq!(q.cut(), vec![]);
        q.push(4, 'e');
        q.push(4, 'f');
        assert_eq!(q.release(1), vec![]);
        assert_eq!(q.cut(), vec!['e']);
        q.push(1, 'g');
        assert_eq!(q.drain(), vec!['g']);
    }

    proptest! {
        /// However a text is split into byte pieces, the decoder yields the same text and every
        /// piece it releases is whole UTF-8 (it is a `String`).
        #[test]
        fn utf8_decoder_split_invariant(s in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..8)) {
            let bytes = s.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut d = Utf8Decoder::default();
            let mut out = String::new();
            let mut prev = 0;
            for p in points.into_iter().chain(std::iter::once(bytes.len())) {
                out.push_str(&d.push(&bytes[prev..p]));
                prev = p;
            }
            out.push_str(&d.finish());
            prop_assert_eq!(out, s);
        }

        /// However the text is split, the released text is exactly the text before the first
        /// stop string (or all of it), and no stop string is ever released.
        #[test]
        fn stop_matcher_split_invariant(
            s in "[ab ]{0,30}",
            stop in "[ab]{1,3}",
            cuts in proptest::collection::vec(0usize..40, 0..6),
        ) {
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (s.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut prev = 0;
            for p in points.into_iter().chain(std::iter::once(s.len())) {
                pieces.push(&s[prev..p]);
                prev = p;
            }
            let (out, stopped) = run(&[stop.as_str()], &pieces);
            match s.find(stop.as_str()) {
                Some(at) => { prop_assert!(stopped); prop_assert_eq!(out, &s[..at]); }
                None => { prop_assert!(!stopped); prop_assert_eq!(out, s.clone()); }
            }
        }
    }
}
