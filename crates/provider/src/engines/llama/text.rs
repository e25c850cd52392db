//! Turning generated token pieces into the text a client sees: whole UTF-8
//! characters only, stop sequences cut out, leading whitespace dropped.
//!
//! Tokens are byte pieces: an emoji can span several tokens, so bytes wait here
//! until they form whole characters. A stop sequence can also span tokens, so
//! text that could be the start of one is held back until the next piece says
//! whether it is; the client never sees any part of a stop sequence.

/// What one [`TextStream::push`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Text that is now final and can be sent.
    pub text: String,
    /// A stop sequence was completed: generation must end, and `text` is all
    /// there will ever be.
    pub stopped: bool,
}

pub struct TextStream {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 character.
    partial: Vec<u8>,
    /// Decoded text not yet sent because it may begin a stop sequence.
    held: String,
    /// Nothing but whitespace has been produced so far.
    at_start: bool,
    trim_start: bool,
    /// A stop sequence was seen; nothing after it is ever released.
    stopped: bool,
}

impl TextStream {
    /// `stops` are matched on the decoded text; empty ones are ignored.
    /// `trim_start` drops whitespace before the first visible character (a
    /// completion-style prompt ends in "Assistant:", so the answer starts with
    /// a space the client does not want).
    pub fn new(stops: Vec<String>, trim_start: bool) -> Self {
        TextStream {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            partial: Vec::new(),
            held: String::new(),
            at_start: true,
            trim_start,
            stopped: false,
        }
    }

    /// Takes the bytes of one token.
    pub fn push(&mut self, bytes: &[u8]) -> Pushed {
        if self.stopped {
            return Pushed {
                text: String::new(),
                stopped: true,
            };
        }
        self.partial.extend_from_slice(bytes);
        let decoded = take_valid_utf8(&mut self.partial);
        let mut decoded = decoded.as_str();
        if self.trim_start && self.at_start {
            decoded = decoded.trim_start();
        }
        if !decoded.is_empty() {
            self.at_start = false;
        }
        self.held.push_str(decoded);

        if let Some(at) = self.earliest_stop() {
            self.held.truncate(at);
            self.stopped = true;
            self.partial.clear();
            return Pushed {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.longest_stop_prefix_suffix();
        let send_to = self.held.len() - keep;
        let text = self.held[..send_to].to_string();
        self.held.drain(..send_to);
        Pushed { text, stopped: false }
    }

    /// Generation ended for another reason: whatever was held back is final.
    /// Bytes of an unfinished character become U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let mut out = std::mem::take(&mut self.held);
        if !self.partial.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
        out
    }

    fn earliest_stop(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min()
    }

    /// Length of the longest end of `held` that some stop sequence starts with.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            // Only proper prefixes: a whole stop sequence was handled already.
            for (len, _) in stop.char_indices().skip(1) {
                if len > best && self.held.ends_with(&stop[..len]) {
                    best = len;
                }
            }
        }
        best
    }
}

/// Removes and returns the longest prefix of `bytes` that is valid UTF-8, leaving
/// an incomplete trailing character in place. Bytes that can never be valid are
/// replaced with U+FFFD rather than blocking the stream forever.
fn take_valid_utf8(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                bytes.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&bytes[..valid]));
                match e.error_len() {
                    // An incomplete character at the end: wait for more bytes.
                    None => {
                        bytes.drain(..valid);
                        return out;
                    }
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        bytes.drain(..valid + bad);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut t = TextStream::new(stops.iter().map(|s| s.to_string()).collect(), false);
        let mut out = String::new();
        for p in pieces {
            let pushed = t.push(p.as_bytes());
            out.push_str(&pushed.text);
            if pushed.stopped {
                return (out, true);
            }
        }
        out.push_str(&t.finish());
        (out, false)
    }

    #[test]
    fn text_without_stops_passes_through() {
        assert_eq!(run(&[], &["Hel", "lo", " world"]), ("Hello world".into(), false));
    }

    #[test]
    fn a_stop_inside_one_piece_cuts_there() {
        assert_eq!(run(&["END"], &["abc", "dEND tail"]), ("abcd".into(), true));
    }

    #[test]
    fn a_stop_split_across_pieces_is_never_sent() {
        let mut t = TextStream::new(vec!["\nUser:".into()], false);
        assert_eq!(t.push(b"Paris.").text, "Paris.");
        let p = t.push(b"\nUs");
        assert_eq!(p, Pushed::default(), "the possible stop start is held");
        let p = t.push(b"er:");
        assert_eq!(
            p,
            Pushed {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_text_is_released_when_it_turns_out_not_to_be_a_stop() {
        let mut t = TextStream::new(vec!["\nUser:".into()], false);
        assert_eq!(t.push(b"a\nU").text, "a");
        assert_eq!(t.push(b"nder").text, "\nUnder");
    }

    #[test]
    fn nothing_after_a_stop_is_released() {
        let mut t = TextStream::new(vec!["X".into()], false);
        assert!(t.push(b"aX\xe2").stopped);
        assert_eq!(t.push(b"more").text, "");
        assert_eq!(t.finish(), "");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["zz", "b"], &["a", "bzz"]), ("a".into(), true));
    }

    #[test]
    fn split_utf8_characters_are_joined() {
        let snow = "☃".as_bytes();
        let mut t = TextStream::new(Vec::new(), false);
        assert_eq!(t.push(&snow[..1]).text, "");
        assert_eq!(t.push(&snow[1..]).text, "☃");
        let mut t = TextStream::new(Vec::new(), false);
        assert_eq!(t.push(&snow[..2]).text, "");
        assert_eq!(t.finish(), "\u{FFFD}");
    }

    #[test]
    fn invalid_bytes_do_not_block_the_stream() {
        let mut t = TextStream::new(Vec::new(), false);
        assert_eq!(t.push(&[b'a', 0xff, b'b']).text, "a\u{FFFD}b");
    }

    #[test]
    fn leading_whitespace_is_trimmed_only_at_the_start() {
        let mut t = TextStream::new(Vec::new(), true);
        assert_eq!(t.push(b" ").text, "");
        assert_eq!(t.push(b" Hi").text, "Hi");
        assert_eq!(t.push(b" there").text, " there");
    }

    #[test]
    fn multibyte_stops_are_held_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), false));
    }
}
