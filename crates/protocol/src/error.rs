//! The OpenAI error shape: `{"error":{"message","type","param","code"}}`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(message: impl Into<String>, kind: &str, param: Option<&str>, code: Option<&str>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings cannot fail; the fallback keeps us panic-free.
        serde_json::to_vec(self).unwrap_or_else(|_| {
            b"{\"error\":{\"message\":\"error\",\"type\":\"api_error\",\"param\":null,\"code\":null}}".to_vec()
        })
    }
}
