//! Chat messages → the token sequence the model continues.
//!
//! A GGUF may carry the chat template it was trained with; llama.cpp knows the
//! common ones and applies it. A base model (Gemma 3 270M, the built-in one) has
//! none, so it gets a plain transcript it can continue as ordinary text:
//!
//! ```text
//! System: You are terse.
//! User: What is the capital of France?
//! Assistant:
//! ```
//!
//! With that format the model would happily write the next "User:" line too, so
//! the engine stops at a line that starts another turn (see [`Prompt::stops`]).

use cxmpute_protocol::openai::{ChatMessage, MessageContent, Role};
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use serde_json::Value;

/// Lines that end an answer in the plain format: the model began another turn.
pub const PLAIN_STOPS: [&str; 2] = ["\nUser:", "\nSystem:"];

/// How messages become text for one model.
#[derive(Debug, Clone)]
pub enum PromptFormat {
    /// The model's own chat template, applied by llama.cpp.
    Template(LlamaChatTemplate),
    /// The plain "Role: text" transcript, for models without a template.
    Plain,
}

impl PromptFormat {
    /// The model's template if it has one that llama.cpp can apply, else plain.
    pub fn for_model(model: &LlamaModel) -> PromptFormat {
        let Ok(template) = model.chat_template(None) else {
            return PromptFormat::Plain;
        };
        // llama.cpp recognises templates by their markers and fails on others;
        // find out now rather than on the first request.
        let probe = LlamaChatMessage::new("user".into(), "hi".into());
        match probe.map(|m| model.apply_chat_template(&template, &[m], true)) {
            Ok(Ok(_)) => PromptFormat::Template(template),
            _ => {
                tracing::warn!(
                    "the model's chat template is not one llama.cpp can apply; using the plain prompt format"
                );
                PromptFormat::Plain
            }
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            PromptFormat::Template(_) => "the model's chat template",
            PromptFormat::Plain => "plain transcript (the model has no chat template)",
        }
    }
}

/// A request's prompt, ready for the engine.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub tokens: Vec<LlamaToken>,
    /// Stop sequences the format itself needs, on top of the client's.
    pub stops: Vec<String>,
    /// Drop whitespace before the answer's first visible character.
    pub trim_start: bool,
}

/// Why a request's messages cannot become a prompt.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptError {
    #[error("this model reads text only; message {0} has a part that is not text")]
    NotText(usize),
    #[error("message {0} contains a NUL character")]
    Nul(usize),
    #[error("the model's chat template could not be applied to these messages")]
    Template,
}

/// The text of a message: a string, or its text parts joined by newlines.
fn message_text(index: usize, message: &ChatMessage) -> Result<String, PromptError> {
    match &message.content {
        None => Ok(String::new()),
        Some(MessageContent::Text(t)) => Ok(t.clone()),
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match part.get("text").and_then(Value::as_str) {
                    Some(t) if part.get("type").and_then(Value::as_str).is_none_or(|k| k == "text") => texts.push(t),
                    _ => return Err(PromptError::NotText(index)),
                }
            }
            Ok(texts.join("\n"))
        }
    }
}

fn plain_label(role: Role) -> &'static str {
    match role {
        Role::System | Role::Developer => "System",
        Role::User => "User",
        Role::Assistant => "Assistant",
        Role::Tool | Role::Function => "Tool",
    }
}

fn template_role(role: Role) -> &'static str {
    match role {
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool | Role::Function => "tool",
    }
}

/// The plain transcript for `messages`, ending in the cue for the answer.
pub fn plain_text(messages: &[ChatMessage]) -> Result<String, PromptError> {
    let mut out = String::new();
    for (i, m) in messages.iter().enumerate() {
        let text = message_text(i, m)?;
        out.push_str(plain_label(m.role));
        out.push_str(": ");
        out.push_str(text.trim());
        out.push('\n');
    }
    // No space after the colon: the model's tokens for the answer start with one,
    // and a trailing space would make it predict an unusual token.
    out.push_str("Assistant:");
    Ok(out)
}

/// Formats and tokenizes `messages` for `model`.
pub fn build(model: &LlamaModel, format: &PromptFormat, messages: &[ChatMessage]) -> Result<Prompt, PromptError> {
    let vocab = model.vocab();
    match format {
        PromptFormat::Plain => {
            let text = plain_text(messages)?;
            // Client text is never parsed for special tokens: "<eos>" typed by a
            // user stays four characters, not an instruction to the model.
            let tokens = vocab.tokenize(text.as_bytes(), true, false);
            Ok(Prompt {
                tokens,
                stops: PLAIN_STOPS.iter().map(|s| s.to_string()).collect(),
                trim_start: true,
            })
        }
        PromptFormat::Template(template) => {
            let mut chat = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                let text = message_text(i, m)?;
                let message =
                    LlamaChatMessage::new(template_role(m.role).into(), text).map_err(|_| PromptError::Nul(i))?;
                chat.push(message);
            }
            let text = model
                .apply_chat_template(template, &chat, true)
                .map_err(|_| PromptError::Template)?;
            // The template's turn markers are special tokens, so they must be parsed.
            let mut tokens = vocab.tokenize(text.as_bytes(), true, true);
            // Templates often write the BOS token themselves; do not start with two.
            let bos = vocab.bos();
            if tokens.len() >= 2 && tokens[0] == bos && tokens[1] == bos {
                tokens.remove(0);
            }
            Ok(Prompt {
                tokens,
                stops: Vec::new(),
                trim_start: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxmpute_protocol::parse::parse_json;

    fn messages(json: &str) -> Vec<ChatMessage> {
        parse_json::<Vec<ChatMessage>>(json.as_bytes()).unwrap()
    }

    #[test]
    fn the_plain_transcript_ends_with_the_answer_cue() {
        let m = messages(
            r#"[{"role":"system","content":"Be brief."},{"role":"user","content":" Hi \n"},
                {"role":"assistant","content":"Hello."},{"role":"user","content":[{"type":"text","text":"Bye"}]}]"#,
        );
        assert_eq!(
            plain_text(&m).unwrap(),
            "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
        );
    }

    #[test]
    fn images_are_refused() {
        let m = messages(
            r#"[{"role":"user","content":"a"},{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]"#,
        );
        assert_eq!(plain_text(&m), Err(PromptError::NotText(1)));
    }
}
