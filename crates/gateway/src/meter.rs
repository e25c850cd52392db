//! Reading what an answer contains while it streams past: SSE events for
//! streamed chat, a streaming page count for scrape answers, a bounded copy
//! of JSON answers for the rest.
//!
//! What the gateway trusts (see docs/metering.md): the node's token counts are
//! accepted only inside bounds the gateway computes itself — prompt tokens
//! cannot exceed the prompt's bytes, completion tokens cannot be fewer than the
//! content chunks the gateway counted nor more than the completion budget.
//! Characters (speech) and pages (scrape) are counted by the gateway alone.

use bytes::{Bytes, BytesMut};
use cxmpute_protocol::openai::Usage;
use serde::Deserialize;

mod scrape;
use scrape::ScrapeScan;

/// Copies of JSON answers larger than this are not kept; such answers are
/// metered from the gateway's own bounds.
const JSON_COPY_LIMIT: usize = 16 << 20;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Usage the node reported, if any.
    pub usage: Option<Usage>,
    /// Stream chunks that carried content, counted by the gateway.
    pub content_chunks: u64,
    /// Bytes of content the gateway saw.
    pub content_bytes: u64,
    /// Scrape results without an error.
    pub pages_ok: Option<u64>,
    /// Bytes of answer forwarded.
    pub bytes: u64,
}

pub enum Meter {
    /// Streamed chat: events pass one by one; `[DONE]` is held back until the
    /// request is settled, and the usage event is dropped when the client did
    /// not ask for it (the gateway always asks the node for it).
    Sse {
        buf: BytesMut,
        strip_usage: bool,
        done: Option<Bytes>,
    },
    /// JSON answers: forwarded as they come, copied (bounded) for metering.
    Json { copy: Vec<u8>, overflow: bool },
    /// Scrape answers: forwarded as they come, pages counted on the way
    /// (any size, no copy).
    Scrape(ScrapeScan),
    /// Audio and other bytes: only counted.
    Opaque,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    message: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

impl Meter {
    pub fn sse(strip_usage: bool) -> Meter {
        Meter::Sse {
            buf: BytesMut::new(),
            strip_usage,
            done: None,
        }
    }

    pub fn json() -> Meter {
        Meter::Json {
            copy: Vec::new(),
            overflow: false,
        }
    }

    pub fn scrape() -> Meter {
        Meter::Scrape(ScrapeScan::new())
    }

    /// Takes one chunk of the answer; returns what to forward now.
    pub fn push(&mut self, chunk: Bytes, seen: &mut Observed) -> Option<Bytes> {
        seen.bytes += chunk.len() as u64;
        match self {
            Meter::Opaque => Some(chunk),
            Meter::Scrape(scan) => {
                scan.push(&chunk);
                Some(chunk)
            }
            Meter::Json { copy, overflow } => {
                if !*overflow {
                    if copy.len() + chunk.len() > JSON_COPY_LIMIT {
                        *overflow = true;
                        copy.clear();
                    } else {
                        copy.extend_from_slice(&chunk);
                    }
                }
                Some(chunk)
            }
            Meter::Sse { buf, strip_usage, done } => {
                buf.extend_from_slice(&chunk);
                let mut out = BytesMut::new();
                while let Some(end) = event_end(buf) {
                    let event = buf.split_to(end).freeze();
                    match inspect_event(&event, seen) {
                        EventKind::Done => *done = Some(event),
                        EventKind::UsageOnly if *strip_usage => {}
                        _ => out.extend_from_slice(&event),
                    }
                }
                (!out.is_empty()).then(|| out.freeze())
            }
        }
    }

    /// The answer ended: finish metering; returns bytes still to forward after
    /// settlement (a held `[DONE]`, or an unterminated last event).
    pub fn finish(&mut self, seen: &mut Observed) -> Option<Bytes> {
        match self {
            Meter::Opaque => None,
            Meter::Scrape(scan) => {
                seen.pages_ok = scan.finish();
                None
            }
            Meter::Json { copy, overflow } => {
                if !*overflow && !copy.is_empty() {
                    if let Ok(c) = serde_json::from_slice::<Chunk>(copy) {
                        seen.usage = c.usage;
                        for choice in &c.choices {
                            if let Some(text) = choice.message.as_ref().and_then(|m| m.content.as_ref()) {
                                seen.content_bytes += text.len() as u64;
                                seen.content_chunks += u64::from(!text.is_empty());
                            }
                        }
                    }
                }
                None
            }
            Meter::Sse { buf, done, .. } => {
                let mut tail = BytesMut::new();
                if !buf.is_empty() {
                    let rest = buf.split().freeze();
                    let _ = inspect_event(&rest, seen);
                    tail.extend_from_slice(&rest);
                }
                if let Some(d) = done.take() {
                    tail.extend_from_slice(&d);
                }
                (!tail.is_empty()).then(|| tail.freeze())
            }
        }
    }
}

/// End (exclusive) of the first complete SSE event in `buf`.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

enum EventKind {
    Done,
    UsageOnly,
    Other,
}

fn inspect_event(event: &[u8], seen: &mut Observed) -> EventKind {
    let mut kind = EventKind::Other;
    let mut rest = event;
    while !rest.is_empty() {
        let line_end = rest.iter().position(|b| *b == b'\n').map_or(rest.len(), |p| p + 1);
        let line = &rest[..line_end];
        rest = &rest[line_end..];
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            return EventKind::Done;
        }
        if let Ok(chunk) = serde_json::from_slice::<Chunk>(data) {
            for choice in &chunk.choices {
                if let Some(text) = choice.delta.as_ref().and_then(|d| d.content.as_ref()) {
                    if !text.is_empty() {
                        seen.content_chunks += 1;
                        seen.content_bytes += text.len() as u64;
                    }
                }
            }
            if let Some(u) = chunk.usage {
                seen.usage = Some(u);
                if chunk.choices.is_empty() {
                    kind = EventKind::UsageOnly;
                }
            }
        }
    }
    kind
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(json: &str) -> String {
        format!("data: {json}\n\n")
    }

    #[test]
    fn sse_counts_content_holds_done_and_strips_usage() {
        let mut m = Meter::sse(true);
        let mut seen = Observed::default();
        let body = [
            ev(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#),
            ev(r#"{"choices":[{"delta":{"content":"Hel"}}]}"#),
            ev(r#"{"choices":[{"delta":{"content":"lo"}}]}"#),
            ev(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        // Split at awkward places: events must survive being cut anywhere.
        let bytes = body.as_bytes();
        let mut forwarded = Vec::new();
        for piece in bytes.chunks(7) {
            if let Some(out) = m.push(Bytes::copy_from_slice(piece), &mut seen) {
                forwarded.extend_from_slice(&out);
            }
        }
        let text = String::from_utf8(forwarded).unwrap();
        assert!(text.contains("Hel") && text.contains("lo"));
        assert!(!text.contains("usage"), "usage chunk must be stripped: {text}");
        assert!(!text.contains("[DONE]"), "[DONE] is held back");
        assert_eq!(seen.content_chunks, 2);
        assert_eq!(seen.content_bytes, 5);
        assert_eq!(seen.usage.unwrap().completion_tokens, 2);
        let tail = m.finish(&mut seen).unwrap();
        assert_eq!(&tail[..], b"data: [DONE]\n\n");
    }

    #[test]
    fn usage_is_kept_when_asked() {
        let mut m = Meter::sse(false);
        let mut seen = Observed::default();
        let out = m
            .push(
                Bytes::from(ev(r#"{"choices":[],"usage":{"prompt_tokens":1}}"#)),
                &mut seen,
            )
            .unwrap();
        assert!(String::from_utf8_lossy(&out).contains("usage"));
    }

    #[test]
    fn json_answers_are_metered_from_a_copy() {
        let mut m = Meter::json();
        let mut seen = Observed::default();
        let body = r#"{"choices":[{"message":{"role":"assistant","content":"abc"}}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#;
        let (a, b) = body.split_at(20);
        assert!(m.push(Bytes::from(a.to_string()), &mut seen).is_some());
        assert!(m.push(Bytes::from(b.to_string()), &mut seen).is_some());
        assert!(m.finish(&mut seen).is_none());
        assert_eq!(seen.usage.unwrap().prompt_tokens, 4);
        assert_eq!(seen.content_bytes, 3);
    }

    #[test]
    fn scrape_pages_are_counted() {
        let mut m = Meter::scrape();
        let mut seen = Observed::default();
        m.push(
            Bytes::from_static(
                br#"{"results":[{"url":"a","markdown":"x"},{"url":"b","error":"boom"},{"url":"c","error":null}]}"#,
            ),
            &mut seen,
        );
        m.finish(&mut seen);
        assert_eq!(seen.pages_ok, Some(2));
    }

    #[test]
    fn crlf_events_split() {
        assert_eq!(event_end(b"data: x\n\r\nrest"), Some(10));
        assert_eq!(event_end(b"data: x\n"), None);
    }
}
