//! The generation settings of an OpenAI chat request, checked once at the edge.

use cxmpute_protocol::openai::ChatRequest;
use serde_json::Value;

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

/// How the next token is picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy: always the most likely token.
    pub temperature: f32,
    /// Nucleus sampling: only the most likely tokens whose probabilities add up
    /// to this are candidates. 1 turns it off.
    pub top_p: f32,
    /// Fixes the random draws, so the same request gives the same answer.
    pub seed: Option<u32>,
}

impl Sampling {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Everything about a chat request the engine and the answer's shape depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatParams {
    /// `max_completion_tokens`, else `max_tokens`; `None` means "until the context is full".
    pub max_tokens: Option<u32>,
    pub sampling: Sampling,
    /// Client stop sequences, non-empty.
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A setting that is out of range, with the field to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub message: String,
    pub param: &'static str,
}

fn invalid(param: &'static str, message: impl Into<String>) -> ParamError {
    ParamError {
        message: message.into(),
        param,
    }
}

/// Reads a number that may be absent or null.
fn number(req: &ChatRequest, name: &'static str) -> Result<Option<f64>, ParamError> {
    match req.extra.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(name, format!("'{name}' must be a number"))),
    }
}

impl ChatParams {
    pub fn from_request(req: &ChatRequest) -> Result<ChatParams, ParamError> {
        if req.n.is_some_and(|n| n != 1) {
            return Err(invalid("n", "only n = 1 is supported"));
        }
        let max_tokens = req.max_output();
        if max_tokens == Some(0) {
            return Err(invalid("max_tokens", "'max_tokens' must be at least 1"));
        }
        let temperature = number(req, "temperature")?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(invalid("temperature", "'temperature' must be between 0 and 2"));
        }
        let top_p = number(req, "top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid("top_p", "'top_p' must be greater than 0 and at most 1"));
        }
        let seed = match req.extra.get("seed") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let s = v.as_i64().ok_or_else(|| invalid("seed", "'seed' must be an integer"))?;
                // OpenAI seeds are 64-bit; llama.cpp's are 32. Folding keeps every
                // bit relevant, so nearby seeds stay distinct.
                let s = s as u64;
                Some((s ^ (s >> 32)) as u32)
            }
        };
        let stop = match req.extra.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                let mut stops = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => stops.push(s.clone()),
                        _ => return Err(invalid("stop", "'stop' must be a string or an array of strings")),
                    }
                }
                stops
            }
            Some(_) => return Err(invalid("stop", "'stop' must be a string or an array of strings")),
        };
        if stop.len() > MAX_STOPS {
            return Err(invalid(
                "stop",
                format!("at most {MAX_STOPS} stop sequences are allowed"),
            ));
        }
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Ok(ChatParams {
            max_tokens,
            sampling: Sampling {
                temperature: temperature as f32,
                top_p: top_p as f32,
                seed,
            },
            stop,
            stream: req.is_stream(),
            include_usage: req.wants_usage_chunk(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxmpute_protocol::parse::parse_json;

    fn params(extra: &str) -> Result<ChatParams, ParamError> {
        let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
        ChatParams::from_request(&parse_json::<ChatRequest>(body.as_bytes()).unwrap())
    }

    #[test]
    fn defaults_follow_openai() {
        let p = params("").unwrap();
        assert_eq!(p.max_tokens, None);
        assert_eq!(
            p.sampling,
            Sampling {
                temperature: 1.0,
                top_p: 1.0,
                seed: None
            }
        );
        assert!(p.stop.is_empty() && !p.stream && !p.include_usage);
    }

    #[test]
    fn settings_are_read() {
        let p = params(
            r#","max_tokens":9,"max_completion_tokens":7,"temperature":0,"top_p":0.5,"seed":42,
               "stop":["\n",""],"stream":true,"stream_options":{"include_usage":true}"#,
        )
        .unwrap();
        assert_eq!(p.max_tokens, Some(7));
        assert!(p.sampling.is_greedy());
        assert_eq!(p.sampling.top_p, 0.5);
        assert_eq!(p.sampling.seed, Some(42));
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert!(p.stream && p.include_usage);
        assert_eq!(params(r#","stop":"END""#).unwrap().stop, vec!["END".to_string()]);
    }

    #[test]
    fn bad_settings_name_their_field() {
        for (extra, field) in [
            (r#","temperature":3"#, "temperature"),
            (r#","temperature":"hot""#, "temperature"),
            (r#","top_p":0"#, "top_p"),
            (r#","seed":1.5"#, "seed"),
            (r#","stop":[1]"#, "stop"),
            (r#","stop":["a","b","c","d","e"]"#, "stop"),
            (r#","max_tokens":0"#, "max_tokens"),
            (r#","n":2"#, "n"),
        ] {
            assert_eq!(params(extra).unwrap_err().param, field, "{extra}");
        }
    }
}
