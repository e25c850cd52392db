//! Text → sentences → IPA phonemes (espeak-ng, run as a program) → the voice's
//! phoneme ids.
//!
//! Piper voices are trained on espeak-ng's IPA output with the clause
//! punctuation kept, one sentence at a time. `espeak-ng --ipa` prints one line
//! per clause and drops the punctuation, so we split sentences ourselves, ask
//! espeak-ng for each one, and put the punctuation back between its clauses.
//!
//! The text goes to espeak-ng on standard input, never as an argument, so input
//! that looks like an option (`-w /etc/passwd`) is only ever spoken.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Marks that the voice config names: start, end, and the pad put after every phoneme.
const BOS: &str = "^";
const EOS: &str = "$";
const PAD: &str = "_";

/// Characters that end a sentence; each sentence is synthesised on its own.
const SENTENCE_END: [char; 3] = ['.', '!', '?'];
/// Characters that end a clause inside a sentence (espeak-ng starts a new line there).
const CLAUSE_END: [char; 3] = [',', ';', ':'];

/// A sentence is cut at this many characters (at a space where possible) so one
/// run of the voice model stays short; espeak-ng and the model slow down on very
/// long inputs and the listener waits for the whole sentence.
const MAX_SENTENCE_CHARS: usize = 400;

/// One piece of text to synthesise, with the punctuation that ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentence {
    pub text: String,
    /// `.`, `!` or `?`; `.` when the text simply ran out.
    pub end: char,
}

/// Splits text into sentences at `.`, `!`, `?` followed by white space (or the
/// end), and at blank lines. Pieces with nothing to say (only punctuation or
/// spaces) are dropped.
pub fn sentences(text: &str) -> Vec<Sentence> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let mut last_newline = false;
    while let Some(c) = chars.next() {
        if c == '\n' {
            if last_newline {
                push_sentence(&mut out, &mut current, '.');
            } else {
                current.push(' ');
            }
            last_newline = true;
            continue;
        }
        if !c.is_whitespace() {
            last_newline = false;
        }
        if SENTENCE_END.contains(&c) {
            // "..." and "?!" end one sentence, not several.
            let mut end = c;
            while let Some(&next) = chars.peek() {
                if SENTENCE_END.contains(&next) {
                    if next != '.' {
                        end = next;
                    }
                    chars.next();
                } else {
                    break;
                }
            }
            if chars.peek().is_none_or(|n| n.is_whitespace()) {
                push_sentence(&mut out, &mut current, end);
                continue;
            }
            current.push(c);
            continue;
        }
        current.push(c);
        if current.chars().count() >= MAX_SENTENCE_CHARS {
            cut_long(&mut out, &mut current);
        }
    }
    push_sentence(&mut out, &mut current, '.');
    out
}

fn push_sentence(out: &mut Vec<Sentence>, current: &mut String, end: char) {
    let text = current.trim();
    if text.chars().any(char::is_alphanumeric) {
        out.push(Sentence {
            text: text.to_string(),
            end,
        });
    }
    current.clear();
}

/// Emits the first part of an over-long sentence, cut at its last space.
fn cut_long(out: &mut Vec<Sentence>, current: &mut String) {
    let cut = current.rfind(' ').filter(|&i| i > 0).unwrap_or(current.len());
    let rest = current.split_off(cut);
    push_sentence(out, current, ',');
    *current = rest.trim_start().to_string();
}

/// The clause punctuation of a sentence, in order, as espeak-ng splits it: a
/// `,` `;` or `:` followed by white space.
fn clause_marks(text: &str) -> Vec<char> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|(i, c)| CLAUSE_END.contains(c) && chars.get(i + 1).is_some_and(|n| n.is_whitespace()))
        .map(|(_, c)| *c)
        .collect()
}

/// Runs espeak-ng (the program) to turn text into IPA.
#[derive(Debug, Clone)]
pub struct Espeak {
    program: PathBuf,
    voice: String,
}

impl Espeak {
    /// Finds `espeak-ng` on the `PATH` (or the program `CXMPUTE_ESPEAK` names).
    pub fn find(voice: &str) -> Result<Self> {
        let program = std::env::var_os("CXMPUTE_ESPEAK")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| find_on_path("espeak-ng"));
        let Some(program) = program else {
            bail!(
                "text to speech needs the espeak-ng program, which is not installed \
                 (Debian/Ubuntu: apt-get install espeak-ng; Fedora: dnf install espeak-ng; \
                 macOS: brew install espeak-ng)"
            );
        };
        let espeak = Self {
            program,
            voice: voice.to_string(),
        };
        // Fails here, at start-up, rather than on the first request.
        espeak
            .ipa("test")
            .with_context(|| format!("espeak-ng ({}) does not work", espeak.program.display()))?;
        Ok(espeak)
    }

    /// The IPA of one sentence: one string per clause, as espeak-ng splits them.
    pub fn ipa(&self, text: &str) -> Result<Vec<String>> {
        let mut child = Command::new(&self.program)
            .args(["-q", "--ipa", "-b", "1", "-v", &self.voice, "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A closed pipe here shows up as a failed exit below.
            let _ = stdin.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().context("espeak-ng did not finish")?;
        if !out.status.success() {
            bail!(
                "espeak-ng failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The phonemes of a sentence with its punctuation restored, as the voices
    /// were trained: clauses joined by their mark and a space, the sentence's
    /// end mark last.
    pub fn phonemes(&self, sentence: &Sentence) -> Result<String> {
        let clauses = self.ipa(&sentence.text)?;
        Ok(join_clauses(&clauses, &clause_marks(&sentence.text), sentence.end))
    }
}

/// Joins espeak-ng's clause lines. When the number of lines matches the clause
/// marks found in the text, each mark goes back where it was; otherwise (espeak
/// split somewhere else, e.g. after "Dr.") a comma stands in, which keeps the
/// pause without guessing wrong.
pub fn join_clauses(clauses: &[String], marks: &[char], end: char) -> String {
    let mut out = String::new();
    let exact = marks.len() + 1 == clauses.len();
    for (i, clause) in clauses.iter().enumerate() {
        out.push_str(clause);
        if i + 1 < clauses.len() {
            let mark = if exact {
                marks.get(i).copied().unwrap_or(',')
            } else {
                ','
            };
            out.push(mark);
            out.push(' ');
        }
    }
    out.push(end);
    out
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

/// The voice's phoneme → ids table (`phoneme_id_map` of its `.onnx.json`).
#[derive(Debug, Clone)]
pub struct PhonemeIds {
    map: HashMap<char, Vec<i64>>,
    bos: Vec<i64>,
    eos: Vec<i64>,
    pad: Vec<i64>,
}

impl PhonemeIds {
    pub fn new(table: &HashMap<String, Vec<i64>>) -> Result<Self> {
        let get = |k: &str| {
            table
                .get(k)
                .cloned()
                .with_context(|| format!("the voice's phoneme_id_map has no '{k}'"))
        };
        let map = table
            .iter()
            .filter_map(|(k, v)| {
                let mut chars = k.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => Some((c, v.clone())),
                    _ => None,
                }
            })
            .collect();
        Ok(Self {
            map,
            bos: get(BOS)?,
            eos: get(EOS)?,
            pad: get(PAD)?,
        })
    }

    /// Ids for one sentence: start, pad, then each known phoneme followed by the
    /// pad, then end. Phonemes the voice does not know are skipped.
    pub fn encode(&self, phonemes: &str) -> Vec<i64> {
        let mut ids = Vec::with_capacity(phonemes.chars().count() * 2 + 4);
        ids.extend_from_slice(&self.bos);
        ids.extend_from_slice(&self.pad);
        for c in phonemes.chars() {
            if let Some(v) = self.map.get(&c) {
                ids.extend_from_slice(v);
                ids.extend_from_slice(&self.pad);
            }
        }
        ids.extend_from_slice(&self.eos);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(s: &[Sentence]) -> Vec<(&str, char)> {
        s.iter().map(|s| (s.text.as_str(), s.end)).collect()
    }

    #[test]
    fn splits_sentences_at_end_marks_followed_by_space() {
        let s = sentences("Hello there. How are you?! Pay 3.50 now... Done");
        assert_eq!(
            texts(&s),
            vec![
                ("Hello there", '.'),
                ("How are you", '!'),
                ("Pay 3.50 now", '.'),
                ("Done", '.')
            ]
        );
    }

    #[test]
    fn blank_lines_end_a_sentence_and_single_newlines_do_not() {
        let s = sentences("A title\n\nfirst line\nsecond line");
        assert_eq!(texts(&s), vec![("A title", '.'), ("first line second line", '.')]);
    }

    #[test]
    fn nothing_to_say_gives_no_sentences() {
        assert!(sentences(" ... !? \n\n ").is_empty());
        assert!(sentences("").is_empty());
    }

    #[test]
    fn long_sentences_are_cut_at_a_space() {
        let long = "word ".repeat(200);
        let s = sentences(&long);
        assert!(s.len() >= 2, "{} pieces", s.len());
        assert!(s.iter().all(|p| p.text.chars().count() <= MAX_SENTENCE_CHARS));
        assert!(s.iter().all(|p| !p.text.starts_with(' ') && p.text.starts_with("word")));
    }

    #[test]
    fn clause_marks_are_put_back_when_espeak_agrees() {
        let marks = clause_marks("Well, yes; maybe: no");
        assert_eq!(marks, vec![',', ';', ':']);
        let clauses: Vec<String> = ["wˈɛl", "jˈɛs", "mˈeɪbiː", "nˈoʊ"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(join_clauses(&clauses, &marks, '?'), "wˈɛl, jˈɛs; mˈeɪbiː: nˈoʊ?");
        // espeak split elsewhere: commas stand in.
        assert_eq!(join_clauses(&clauses[..2], &marks, '.'), "wˈɛl, jˈɛs.");
    }

    #[test]
    fn ids_follow_the_piper_layout() {
        let table: HashMap<String, Vec<i64>> = [("_", 0), ("^", 1), ("$", 2), (" ", 3), ("a", 14), ("ˈ", 120)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), vec![v]))
            .collect();
        let ids = PhonemeIds::new(&table).expect("table");
        // Unknown "z" is skipped; every phoneme is followed by the pad.
        assert_eq!(ids.encode("ˈa za"), vec![1, 0, 120, 0, 14, 0, 3, 0, 14, 0, 2]);
    }

    #[test]
    fn a_table_without_markers_is_refused() {
        let table: HashMap<String, Vec<i64>> = [("a".to_string(), vec![1])].into_iter().collect();
        assert!(PhonemeIds::new(&table).is_err());
    }
}
