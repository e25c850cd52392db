//! JSON parsing that turns serde's errors into a message and the offending field.

use serde::de::DeserializeOwned;

/// A request body that could not be parsed: what is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub message: String,
    /// Dotted path of the field at fault (`messages[0].role`), when known.
    pub param: Option<String>,
}

/// Parses `bytes` as `T`, naming the field at fault on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ParseError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ParseError {
            message: format!(
                "request body is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
            param: None,
        });
    }
    // Well-formed bodies (nearly all) take the plain parser; only a failure
    // pays for parsing again with the path tracked, to name the field at fault.
    if let Ok(v) = serde_json::from_slice::<T>(bytes) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let message = inner.to_string();
            let param = if let Some(field) = missing_field(&message) {
                Some(if path == "." {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                })
            } else if path == "." || inner.is_syntax() || inner.is_eof() {
                None
            } else {
                Some(path)
            };
            let message = if inner.is_syntax() || inner.is_eof() {
                format!("We could not parse the JSON body of your request: {message}")
            } else {
                match &param {
                    Some(p) => format!("Invalid value for '{p}': {message}"),
                    None => format!("Invalid request body: {message}"),
                }
            };
            Err(ParseError { message, param })
        }
    }
}

fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Req {
        model: String,
        messages: Vec<Msg>,
    }
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Msg {
        role: String,
    }

    #[test]
    fn names_the_missing_field() {
        let e = parse_json::<Req>(br#"{"messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse_json::<Req>(br#"{"model":"m","messages":[{}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn names_the_mistyped_field() {
        let e = parse_json::<Req>(br#"{"model":5,"messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }

    #[test]
    fn syntax_errors_have_no_param() {
        let e = parse_json::<Req>(b"{\"model\":").unwrap_err();
        assert_eq!(e.param, None);
        assert!(e.message.starts_with("We could not parse the JSON body"));
        let e = parse_json::<Req>(b"{\"model\":\"\xff\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"));
    }
}
