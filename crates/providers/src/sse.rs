//! Reading an upstream's server-sent events: bytes are split into events on blank lines
//! (whole bytes, so a character split across network chunks survives), and each event's
//! `event:` name and joined `data:` lines go to a translator that turns them into chat events.

use std::collections::VecDeque;

use futures::{Stream, StreamExt};

use crate::ChatEvent;

/// Turns one upstream's events into chat events.
pub(crate) trait Translator: Send + 'static {
    /// One event: its `event:` name, if any, and its data.
    fn on_event(&mut self, event: Option<&str>, data: &str, out: &mut Vec<ChatEvent>);
    /// The upstream's stream ended (cleanly or not).
    fn on_end(&mut self, out: &mut Vec<ChatEvent>);
    /// Whether the stream is over because of an error already reported.
    fn failed(&self) -> bool;
}

/// Splits complete events off the front of `buf`: `(event name, data)`.
fn split(buf: &mut Vec<u8>) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    loop {
        let Some(end) = buf.windows(2).position(|w| w == b"\n\n") else {
            return out;
        };
        let raw: Vec<u8> = buf.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&raw);
        let mut name = None;
        let mut data: Vec<&str> = Vec::new();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !data.is_empty() {
            out.push((name, data.join("\n")));
        }
    }
}

/// The chat events of an upstream's SSE body.
pub(crate) fn events<S, T>(bytes: S, translator: T) -> impl Stream<Item = ChatEvent> + Send
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + Unpin + 'static,
    T: Translator,
{
    futures::stream::unfold(
        (
            bytes,
            translator,
            Vec::<u8>::new(),
            VecDeque::<ChatEvent>::new(),
            false,
        ),
        |(mut bytes, mut t, mut buf, mut queue, mut ended)| async move {
            loop {
                if let Some(ev) = queue.pop_front() {
                    return Some((ev, (bytes, t, buf, queue, ended)));
                }
                if ended || t.failed() {
                    return None;
                }
                let mut out = Vec::new();
                match bytes.next().await {
                    Some(Ok(chunk)) => {
                        buf.extend(chunk.iter().copied().filter(|&b| b != b'\r'));
                        for (name, data) in split(&mut buf) {
                            t.on_event(name.as_deref(), data.trim(), &mut out);
                            if t.failed() {
                                break;
                            }
                        }
                    }
                    Some(Err(_)) | None => {
                        ended = true;
                        t.on_end(&mut out);
                    }
                }
                queue.extend(out);
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn events_split_on_blank_lines_keeping_split_characters() {
        let mut buf = b"event: a\ndata: {\"x\":\n".to_vec();
        assert!(split(&mut buf).is_empty());
        buf.extend_from_slice(b"data: \"\xc3");
        buf.extend_from_slice(b"\xa9\"}\n\n: comment\n\ndata: [DONE]\n\n");
        let got = split(&mut buf);
        assert_eq!(
            got,
            vec![
                (Some("a".into()), "{\"x\":\n\"\u{e9}\"}".into()),
                (None, "[DONE]".into())
            ]
        );
        assert!(buf.is_empty());
    }
}
