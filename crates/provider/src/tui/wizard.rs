//! First-run setup: device name, location, services to offer and limits.
//! The answers are saved as the node's config file and used from then on.
//!
//! The form is a plain state machine ([`Wizard::key`]) and a draw function, so
//! tests drive it with key events and read the rendering back.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use ratatui::Frame;

use crate::config::{Location, NodeConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Number,
    Toggle,
    Button,
}

#[derive(Debug, Clone)]
struct Field {
    label: &'static str,
    kind: Kind,
    text: String,
    on: bool,
    help: &'static str,
}

impl Field {
    fn text(label: &'static str, value: &str, help: &'static str) -> Self {
        Self {
            label,
            kind: Kind::Text,
            text: value.into(),
            on: false,
            help,
        }
    }
    fn number(label: &'static str, value: u64, help: &'static str) -> Self {
        Self {
            kind: Kind::Number,
            ..Self::text(label, &value.to_string(), help)
        }
    }
    fn toggle(label: &'static str, on: bool, help: &'static str) -> Self {
        Self {
            kind: Kind::Toggle,
            on,
            ..Self::text(label, "", help)
        }
    }
}

const NAME: usize = 0;
const COUNTRY: usize = 1;
const REGION: usize = 2;
const CITY: usize = 3;
const CHAT: usize = 4;
const EMBEDDINGS: usize = 5;
const SPEECH: usize = 6;
const SCRAPE: usize = 7;
const CONCURRENCY: usize = 8;
const VRAM: usize = 9;
const DISK: usize = 10;
const SAVE: usize = 11;

/// Longest text a field takes.
const MAX_TEXT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Keep asking.
    Editing,
    /// The person saved; apply with [`Wizard::apply`].
    Done,
    /// The person gave up (Esc or Ctrl-C): start nothing.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Wizard {
    fields: Vec<Field>,
    focus: usize,
    error: Option<String>,
}

impl Wizard {
    /// A form prefilled from `config` (and the machine's name).
    pub fn new(config: &NodeConfig, default_name: &str) -> Self {
        let loc = &config.location;
        let name = config.device_name.clone().unwrap_or_else(|| default_name.to_string());
        let fields = vec![
            Field::text("Device name", &name, "how this computer appears on your dashboard"),
            Field::text(
                "Country",
                loc.country.as_deref().unwrap_or(""),
                "e.g. US, DE, Kenya (optional)",
            ),
            Field::text(
                "Region",
                loc.region.as_deref().unwrap_or(""),
                "state or province (optional)",
            ),
            Field::text("City", loc.city.as_deref().unwrap_or(""), "(optional)"),
            Field::toggle("Chat", config.chat, "answer chat completions (Gemma 3 270M, 253 MB)"),
            Field::toggle("Embeddings", config.embeddings, "sentence embeddings (MiniLM, 90 MB)"),
            Field::toggle(
                "Speech",
                config.speech,
                "text to speech (Piper voice, 63 MB; needs espeak-ng)",
            ),
            Field::toggle("Web scraping", config.scrape, "fetch public web pages as markdown"),
            Field::number(
                "Max requests at once",
                u64::from(config.max_concurrency),
                "more wait in line",
            ),
            Field::number(
                "Max GPU memory (MB)",
                config.max_vram_mb.unwrap_or(0),
                "0 = use no GPU memory",
            ),
            Field::number(
                "Max disk for models (MB)",
                config.max_disk_mb.unwrap_or(10_240),
                "models larger than this are not downloaded",
            ),
            Field {
                kind: Kind::Button,
                ..Field::text("Save and start", "", "Enter saves the answers and starts the node")
            },
        ];
        Self {
            fields,
            focus: 0,
            error: None,
        }
    }

    pub fn key(&mut self, key: KeyEvent) -> Outcome {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Esc => return Outcome::Cancelled,
            KeyCode::Char('c') if ctrl => return Outcome::Cancelled,
            KeyCode::Tab | KeyCode::Down => self.move_focus(1),
            KeyCode::BackTab | KeyCode::Up => self.move_focus(-1),
            KeyCode::Enter => {
                if self.focus == SAVE {
                    return match self.validate() {
                        Ok(()) => Outcome::Done,
                        Err(e) => {
                            self.error = Some(e);
                            Outcome::Editing
                        }
                    };
                }
                self.move_focus(1);
            }
            code => {
                let field = &mut self.fields[self.focus];
                match (field.kind, code) {
                    (Kind::Toggle, KeyCode::Char(' ')) => field.on = !field.on,
                    (Kind::Text, KeyCode::Char(c))
                        if !ctrl && !c.is_control() && field.text.chars().count() < MAX_TEXT =>
                    {
                        field.text.push(c)
                    }
                    (Kind::Number, KeyCode::Char(c)) if c.is_ascii_digit() && field.text.len() < 9 => {
                        field.text.push(c)
                    }
                    (Kind::Text | Kind::Number, KeyCode::Backspace) => {
                        field.text.pop();
                    }
                    _ => {}
                }
                self.error = None;
            }
        }
        Outcome::Editing
    }

    fn move_focus(&mut self, by: isize) {
        let n = self.fields.len() as isize;
        self.focus = (((self.focus as isize + by) % n + n) % n) as usize;
    }

    fn number(&self, i: usize) -> u64 {
        self.fields[i].text.parse().unwrap_or(0)
    }

    fn validate(&self) -> Result<(), String> {
        if self.fields[NAME].text.trim().is_empty() {
            return Err("give this device a name".into());
        }
        if ![CHAT, EMBEDDINGS, SPEECH, SCRAPE].iter().any(|&i| self.fields[i].on) {
            return Err("offer at least one service".into());
        }
        if self.number(CONCURRENCY) == 0 {
            return Err("allow at least one request at once".into());
        }
        Ok(())
    }

    /// Writes the answers into `config`.
    pub fn apply(&self, config: &mut NodeConfig) {
        let opt = |i: usize| {
            let t = self.fields[i].text.trim();
            (!t.is_empty()).then(|| t.to_string())
        };
        config.device_name = opt(NAME);
        config.location = Location {
            country: opt(COUNTRY),
            region: opt(REGION),
            city: opt(CITY),
        };
        config.chat = self.fields[CHAT].on;
        config.embeddings = self.fields[EMBEDDINGS].on;
        config.speech = self.fields[SPEECH].on;
        config.scrape = self.fields[SCRAPE].on;
        config.max_concurrency = u32::try_from(self.number(CONCURRENCY)).unwrap_or(u32::MAX).max(1);
        config.max_vram_mb = Some(self.number(VRAM));
        config.max_disk_mb = Some(self.number(DISK));
    }

    pub fn draw(&self, frame: &mut Frame) {
        let [title, form, help] =
            Layout::vertical([Constraint::Length(3), Constraint::Min(3), Constraint::Length(3)]).areas(frame.area());
        frame.render_widget(
            Paragraph::new("Set up this node: answer once, change later in the config file.").block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(" cxmpute provider · first run "),
            ),
            title,
        );
        let lines: Vec<Line> = self
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let focused = i == self.focus;
                let marker = if focused { "> " } else { "  " };
                let value = match f.kind {
                    Kind::Text | Kind::Number => {
                        format!("{}{}", f.text, if focused { "_" } else { "" })
                    }
                    Kind::Toggle => (if f.on { "[x]" } else { "[ ]" }).to_string(),
                    Kind::Button => String::new(),
                };
                let style = if focused {
                    Style::default().fg(Color::Cyan).add_modifier(Modifier::BOLD)
                } else {
                    Style::default()
                };
                if f.kind == Kind::Button {
                    Line::from(Span::styled(format!("{marker}[ {} ]", f.label), style))
                } else {
                    Line::from(vec![
                        Span::styled(format!("{marker}{:<26}", f.label), style),
                        Span::raw(value),
                    ])
                }
            })
            .collect();
        frame.render_widget(
            Paragraph::new(lines).block(Block::default().borders(Borders::ALL)),
            form,
        );
        let hint = match &self.error {
            Some(e) => Line::from(Span::styled(e.clone(), Style::default().fg(Color::Red))),
            None => Line::from(format!(
                "{} · Tab/↓ next · Shift-Tab/↑ back · Space toggles · Enter on Save · Esc quits",
                self.fields[self.focus].help
            )),
        };
        frame.render_widget(
            Paragraph::new(hint)
                .wrap(Wrap { trim: true })
                .block(Block::default().borders(Borders::ALL)),
            help,
        );
    }
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::KeyEventKind;
    use ratatui::Terminal;

    use super::*;

    fn press(w: &mut Wizard, code: KeyCode) -> Outcome {
        w.key(KeyEvent::new_with_kind(code, KeyModifiers::NONE, KeyEventKind::Press))
    }

    fn type_text(w: &mut Wizard, s: &str) {
        for c in s.chars() {
            press(w, KeyCode::Char(c));
        }
    }

    #[test]
    fn answers_end_up_in_the_config() {
        let mut config = NodeConfig::default();
        let mut w = Wizard::new(&config, "box");
        // Name: "box" + "-1".
        type_text(&mut w, "-1");
        press(&mut w, KeyCode::Tab);
        type_text(&mut w, "DE");
        press(&mut w, KeyCode::Enter); // Enter moves on, to the region
        press(&mut w, KeyCode::Tab); // left empty
        type_text(&mut w, "Berlin");
        press(&mut w, KeyCode::Tab); // chat
        press(&mut w, KeyCode::Char(' ')); // chat off
        for _ in 0..4 {
            press(&mut w, KeyCode::Tab);
        }
        // Max requests: 64 → 8.
        press(&mut w, KeyCode::Backspace);
        press(&mut w, KeyCode::Backspace);
        type_text(&mut w, "8x"); // the letter is ignored
        press(&mut w, KeyCode::Up);
        press(&mut w, KeyCode::Down);
        for _ in 0..3 {
            press(&mut w, KeyCode::Tab);
        }
        assert_eq!(press(&mut w, KeyCode::Enter), Outcome::Done);
        w.apply(&mut config);
        assert_eq!(config.device_name.as_deref(), Some("box-1"));
        assert_eq!(config.location.country.as_deref(), Some("DE"));
        assert_eq!(config.location.region, None);
        assert_eq!(config.location.city.as_deref(), Some("Berlin"));
        assert!(!config.chat && config.embeddings && config.speech && config.scrape);
        assert_eq!(config.max_concurrency, 8);
        assert_eq!(config.max_vram_mb, Some(0));
    }

    #[test]
    fn saving_needs_a_name_and_a_service() {
        let config = NodeConfig {
            chat: false,
            embeddings: false,
            speech: false,
            scrape: false,
            ..NodeConfig::default()
        };
        let mut w = Wizard::new(&config, "");
        press(&mut w, KeyCode::BackTab); // wraps to Save
        assert_eq!(press(&mut w, KeyCode::Enter), Outcome::Editing);
        assert_eq!(w.error.as_deref(), Some("give this device a name"));
        press(&mut w, KeyCode::Tab); // back to the name
        type_text(&mut w, "n");
        press(&mut w, KeyCode::BackTab);
        assert_eq!(press(&mut w, KeyCode::Enter), Outcome::Editing);
        assert_eq!(w.error.as_deref(), Some("offer at least one service"));
        assert_eq!(press(&mut w, KeyCode::Esc), Outcome::Cancelled);
    }

    #[test]
    fn the_form_renders_every_question() {
        let w = Wizard::new(&NodeConfig::default(), "box");
        let mut terminal = Terminal::new(TestBackend::new(100, 24)).expect("terminal");
        terminal.draw(|f| w.draw(f)).expect("draw");
        let buffer = terminal.backend().buffer().clone();
        let text: String = (0..buffer.area.height)
            .flat_map(|y| (0..buffer.area.width).map(move |x| (x, y)))
            .map(|p| buffer[p].symbol().to_string())
            .collect();
        for want in [
            "Device name",
            "box_",
            "Country",
            "[x]",
            "Max GPU memory",
            "Save and start",
        ] {
            assert!(text.contains(want), "missing {want}");
        }
    }
}
