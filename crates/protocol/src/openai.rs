//! The OpenAI-compatible requests we accept.
//!
//! Each type holds the fields we validate, route on or meter; anything else the
//! client sent stays in `extra` and is forwarded unchanged, so engines see the
//! request as the client wrote it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn wants_usage_chunk(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The completion budget the client asked for, if any.
    pub fn max_output(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Bytes of text in the prompt: no tokenizer makes more tokens than bytes,
    /// so this bounds the prompt tokens from above.
    pub fn prompt_bytes(&self) -> u64 {
        self.messages.iter().map(ChatMessage::text_bytes).sum()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    fn text_bytes(&self) -> u64 {
        let content = match &self.content {
            Some(MessageContent::Text(t)) => t.len() as u64,
            Some(MessageContent::Parts(parts)) => parts.iter().map(part_bytes).sum(),
            None => 0,
        };
        // Role markers and separators that chat templates add.
        content + 8
    }
}

/// Bytes a content part weighs: its text, or an image's URL / data URL (vision
/// engines turn an image into far fewer tokens than its encoded bytes).
fn part_bytes(part: &Value) -> u64 {
    if let Some(text) = part.get("text").and_then(Value::as_str) {
        return text.len() as u64;
    }
    if let Some(url) = part.get("image_url").and_then(|i| i.get("url")).and_then(Value::as_str) {
        return url.len() as u64;
    }
    part.to_string().len() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    /// Text and image parts, kept as sent so nothing is lost on the way.
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// `input` may be a string, strings, or pre-tokenised ids (one list or many).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    pub fn count(&self) -> usize {
        match self {
            EmbeddingInput::One(_) | EmbeddingInput::Tokens(_) => 1,
            EmbeddingInput::Many(v) => v.len(),
            EmbeddingInput::ManyTokens(v) => v.len(),
        }
    }

    /// An upper bound on the tokens the input can become.
    pub fn max_tokens(&self) -> u64 {
        // [CLS]/[SEP]-style markers around every input.
        let markers = 2 * self.count() as u64;
        markers
            + match self {
                EmbeddingInput::One(s) => s.len() as u64,
                EmbeddingInput::Many(v) => v.iter().map(|s| s.len() as u64).sum(),
                EmbeddingInput::Tokens(t) => t.len() as u64,
                EmbeddingInput::ManyTokens(v) => v.iter().map(|t| t.len() as u64).sum(),
            }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            EmbeddingInput::One(_) => false,
            EmbeddingInput::Many(v) => v.is_empty(),
            EmbeddingInput::Tokens(t) => t.is_empty(),
            EmbeddingInput::ManyTokens(v) => v.is_empty() || v.iter().any(Vec::is_empty),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeechRequest {
    pub model: String,
    pub input: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<f32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The original `/v1/tts` body: `{text, voice}` with the model implied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LegacyTtsRequest {
    pub text: String,
    #[serde(default)]
    pub voice: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScrapeRequest {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub owned_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_json;

    #[test]
    fn chat_keeps_unknown_fields() {
        let r: ChatRequest =
            parse_json(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.2,"stream":true}"#)
                .unwrap();
        assert!(r.is_stream());
        assert_eq!(r.extra["temperature"], 0.2);
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["temperature"], 0.2);
        assert_eq!(back["messages"][0]["content"], "hi");
    }

    #[test]
    fn chat_rejects_bad_roles() {
        let e = parse_json::<ChatRequest>(br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn vision_parts_parse() {
        let r: ChatRequest = parse_json(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"what"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
        )
        .unwrap();
        assert!(r.prompt_bytes() > 4);
    }

    #[test]
    fn embedding_inputs() {
        let r: EmbeddingsRequest = parse_json(br#"{"model":"m","input":["a","bc"]}"#).unwrap();
        assert_eq!(r.input.count(), 2);
        assert_eq!(r.input.max_tokens(), 3 + 4);
        let r: EmbeddingsRequest = parse_json(br#"{"model":"m","input":"abc","encoding_format":"base64"}"#).unwrap();
        assert_eq!(r.encoding_format, Some(EncodingFormat::Base64));
        assert!(parse_json::<EmbeddingsRequest>(br#"{"model":"m","input":5}"#).is_err());
    }
}
