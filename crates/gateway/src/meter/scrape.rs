//! Counting the pages of a scrape answer as it streams past, without keeping
//! a copy of it.
//!
//! A scrape answer is `{"results": [{…}, {…}, …], …}`; a page counts when its
//! object has no `error` or a `null` one. Pages can be large (a node may send
//! up to 50 of them at once), so instead of parsing a copy of the whole body,
//! a small byte-level scanner follows the JSON structure and looks only at
//! the keys that matter. Its memory is bounded by [`MAX_DEPTH`], whatever
//! the answer's size.
//!
//! The scanner checks structure (brackets, strings, where keys may appear),
//! not every detail of JSON syntax: it never decodes a string or a number.
//! An answer it cannot follow counts as unreadable, and is billed like a
//! parse failure was before: no pages (see docs/metering.md).

/// Nesting deeper than this is refused. Real answers nest four levels.
const MAX_DEPTH: usize = 64;

/// Longest key that matters (`results`); longer keys are only skipped.
const KEY_CAP: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The answer's top-level object.
    Root,
    /// The `results` array of the root object.
    Results,
    /// One result: an object directly inside `results`.
    Item { failed: bool },
    /// Anything else.
    Other,
}

/// Where a container is in its grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Object: a key (after `{` or `,`).
    Key,
    /// Object: the `:` after a key.
    Colon,
    /// A value (after `:` in an object, `[` or `,` in an array).
    Value,
    /// A `,` or the closing bracket.
    Next,
}

#[derive(Debug, Clone, Copy)]
struct Container {
    is_object: bool,
    role: Role,
    expect: Expect,
    /// Nothing inside yet: only here may the container close at once.
    empty: bool,
    /// In an object: the key of the value being read.
    key: Key,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Results,
    Error,
    Other,
}

#[derive(Debug, Default)]
pub struct ScrapeScan {
    stack: Vec<Container>,
    in_string: bool,
    escaped: bool,
    /// The string being read is a key.
    in_key: bool,
    key: [u8; KEY_CAP],
    key_len: usize,
    key_escaped: bool,
    /// Inside a number or a literal (`true`, `false`, `null`).
    in_literal: bool,
    root_done: bool,
    broken: bool,
    ok: u64,
}

impl ScrapeScan {
    pub fn new() -> ScrapeScan {
        ScrapeScan::default()
    }

    /// Takes the next bytes of the answer.
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.broken {
                return;
            }
            self.byte(b);
        }
    }

    /// Pages without an error, or `None` when the answer was not a complete
    /// scrape answer.
    pub fn finish(&self) -> Option<u64> {
        (self.root_done && !self.broken && !self.in_string).then_some(self.ok)
    }

    fn byte(&mut self, b: u8) {
        if self.in_string {
            self.string_byte(b);
            return;
        }
        if self.in_literal {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-') {
                return;
            }
            self.in_literal = false;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ if self.root_done => self.broken = true,
            b'"' => {
                self.in_string = true;
                match self.stack.last_mut() {
                    Some(top) if top.is_object && top.expect == Expect::Key => {
                        top.empty = false;
                        self.in_key = true;
                        self.key_len = 0;
                        self.key_escaped = false;
                    }
                    _ => {
                        self.value_starts(b'"');
                    }
                }
            }
            b'{' | b'[' => {
                let role = self.value_starts(b);
                if self.stack.len() >= MAX_DEPTH {
                    self.broken = true;
                    return;
                }
                let is_object = b == b'{';
                self.stack.push(Container {
                    is_object,
                    role,
                    expect: if is_object { Expect::Key } else { Expect::Value },
                    empty: true,
                    key: Key::Other,
                });
            }
            b'}' | b']' => self.close(b == b'}'),
            b':' => match self.stack.last_mut() {
                Some(top) if top.expect == Expect::Colon => top.expect = Expect::Value,
                _ => self.broken = true,
            },
            b',' => match self.stack.last_mut() {
                Some(top) if top.expect == Expect::Next => {
                    top.expect = if top.is_object { Expect::Key } else { Expect::Value };
                }
                _ => self.broken = true,
            },
            _ => {
                self.value_starts(b);
                self.in_literal = true;
            }
        }
    }

    fn string_byte(&mut self, b: u8) {
        if self.escaped {
            self.escaped = false;
            return;
        }
        match b {
            b'\\' => {
                self.escaped = true;
                self.key_escaped |= self.in_key;
            }
            b'"' => {
                self.in_string = false;
                if self.in_key {
                    self.in_key = false;
                    self.key_read();
                }
            }
            _ if self.in_key => {
                if self.key_len < KEY_CAP {
                    self.key[self.key_len] = b;
                }
                self.key_len += 1;
            }
            _ => {}
        }
    }

    fn key_read(&mut self) {
        let key = match (&self.key[..self.key_len.min(KEY_CAP)], self.key_escaped) {
            (b"results", false) if self.key_len == 7 => Key::Results,
            (b"error", false) if self.key_len == 5 => Key::Error,
            _ => Key::Other,
        };
        if let Some(top) = self.stack.last_mut() {
            top.expect = Expect::Colon;
            top.key = key;
        }
    }

    /// A value begins with byte `first`; returns the role a container
    /// starting here takes.
    fn value_starts(&mut self, first: u8) -> Role {
        let Some(top) = self.stack.last_mut() else {
            // The answer itself must be an object.
            if first != b'{' {
                self.broken = true;
            }
            return Role::Root;
        };
        if top.expect != Expect::Value {
            self.broken = true;
            return Role::Other;
        }
        top.expect = Expect::Next;
        top.empty = false;
        if top.is_object {
            return match (top.role, top.key) {
                (Role::Root, Key::Results) if first == b'[' => Role::Results,
                (Role::Item { .. }, Key::Error) => {
                    if first != b'n' {
                        top.role = Role::Item { failed: true };
                    }
                    Role::Other
                }
                _ => Role::Other,
            };
        }
        match top.role {
            // A result that is not an object is no page.
            Role::Results if first == b'{' => Role::Item { failed: false },
            _ => Role::Other,
        }
    }

    fn close(&mut self, is_object: bool) {
        let Some(done) = self.stack.pop() else {
            self.broken = true;
            return;
        };
        let complete = done.expect == Expect::Next || (done.empty && done.expect != Expect::Colon);
        if done.is_object != is_object || !complete {
            self.broken = true;
            return;
        }
        match done.role {
            Role::Item { failed: false } => self.ok += 1,
            Role::Root => self.root_done = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(body: &str) -> Option<u64> {
        let mut scan = ScrapeScan::new();
        scan.push(body.as_bytes());
        scan.finish()
    }

    /// What the scanner must agree with: serde_json reading the whole body.
    fn reference(body: &str) -> Option<u64> {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        // An answer without results has no pages (as a struct with a
        // defaulted `results` field would read it).
        let Some(results) = v.as_object()?.get("results") else {
            return Some(0);
        };
        let results = results.as_array()?;
        Some(
            results
                .iter()
                .filter(|r| {
                    r.as_object()
                        .is_some_and(|o| o.get("error").is_none_or(|e| e.is_null()))
                })
                .count() as u64,
        )
    }

    #[test]
    fn counts_results_without_an_error() {
        let body = r#"{"results":[{"url":"a","markdown":"x"},{"url":"b","error":"boom"},{"url":"c","error":null}]}"#;
        assert_eq!(count(body), Some(2));
        assert_eq!(count(body), reference(body));
    }

    #[test]
    fn agrees_with_a_full_parse_on_tricky_answers() {
        let bodies = [
            // Keys and brackets inside strings are text.
            r#"{"results":[{"markdown":"{\"error\": 1} ] [ }","url":"x"}]}"#,
            // An error object, an error number, false, an empty error string.
            r#"{"results":[{"error":{"code":1}},{"error":0},{"error":false},{"error":""},{}]}"#,
            // Nested results and error keys deeper down do not count.
            r#"{"meta":{"results":[{}]},"results":[{"metadata":{"error":"x"}},{"links":[{"error":1}]}]}"#,
            // Whitespace everywhere, escaped quotes and backslashes.
            "{ \"results\" : [ { \"title\" : \"a \\\"q\\\" \\\\\" , \"error\" : null } ,\n { } ] }",
            // Non-object results are no pages.
            r#"{"results":["a",1,null,[],{"url":"ok"}]}"#,
            r#"{"results":[]}"#,
            r#"{"other":1}"#,
            // Numbers and literals as values.
            r#"{"results":[{"status":200,"ratio":-1.5e3,"ok":true,"error":null}],"took":12}"#,
        ];
        for body in bodies {
            assert_eq!(count(body), reference(body), "{body}");
        }
    }

    #[test]
    fn any_split_gives_the_same_count() {
        let body = r#"{"results":[{"url":"a","markdown":"x \"y\" \\"},{"url":"b","error":"boom"},{"error":null}]}"#;
        for size in 1..body.len() {
            let mut scan = ScrapeScan::new();
            for piece in body.as_bytes().chunks(size) {
                scan.push(piece);
            }
            assert_eq!(scan.finish(), Some(2), "chunks of {size}");
        }
    }

    #[test]
    fn unreadable_answers_count_nothing() {
        for body in [
            "",
            "[]",
            r#"{"results":[{"url":"a"}]"#,
            r#"{"results":[{"url":"a"}]}}"#,
            r#"{"results":[{"url":"a"]}"#,
            r#"{"results":[{"url":"a"}]} x"#,
            r#"{"results" [{}]}"#,
            r#"{[{}]}"#,
        ] {
            assert_eq!(count(body), None, "{body}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_with_bounded_memory() {
        let body = format!(
            r#"{{"results":[{{"x":{}1{}}}]}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let mut scan = ScrapeScan::new();
        scan.push(body.as_bytes());
        assert_eq!(scan.finish(), None);
        assert!(scan.stack.capacity() <= 2 * MAX_DEPTH);
    }

    #[test]
    fn a_large_answer_is_counted_whole() {
        // Far over what a copy-and-parse meter would keep (16 MiB).
        let page = format!(r#"{{"url":"u","markdown":"{}"}}"#, "m".repeat(1 << 20));
        let mut scan = ScrapeScan::new();
        scan.push(br#"{"results":["#);
        for i in 0..40 {
            if i > 0 {
                scan.push(b",");
            }
            scan.push(page.as_bytes());
        }
        scan.push(br#",{"url":"v","error":"timeout"}]}"#);
        assert_eq!(scan.finish(), Some(40));
    }
}
