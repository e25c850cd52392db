//! The live dashboard and the start-up splash, drawn from a [`Snapshot`].
//!
//! Drawing is a pure function of what it is given ([`View`]), so tests render
//! it on ratatui's test backend at any size and read the text back.

use std::time::{Duration, SystemTime};

use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, Wrap};
use ratatui::Frame;

use crate::status::{Phase, Snapshot};

/// Fixed facts about this node, shown in the header.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub gateway: String,
    pub device_name: String,
    /// e.g. "Tier 0 · Basic (no GPU counted)".
    pub tier: String,
    /// e.g. "AMD EPYC 7B13 · 2 threads · 23.4 GiB RAM · GPU: none".
    pub hardware: String,
}

/// Everything one frame shows.
pub struct View<'a> {
    pub facts: &'a NodeFacts,
    pub snapshot: &'a Snapshot,
    /// Output tokens per second over the last few seconds.
    pub tokens_per_sec: f64,
    /// Requests finished per interval, oldest first (for the sparkline).
    pub history: &'a [u64],
    pub earnings_age: Option<Duration>,
    /// Frame counter, for the spinner.
    pub tick: u64,
}

const SPINNER: [&str; 4] = ["|", "/", "-", "\\"];

/// Credits (10⁻⁹ USD) as dollars.
pub fn usd(credits: i64) -> String {
    format!("${:.6}", credits as f64 / 1e9)
}

fn phase_line(phase: &Phase, tick: u64) -> (String, Color) {
    let spin = SPINNER[(tick % 4) as usize];
    match phase {
        Phase::Loading(step) => (format!("{spin} starting: {step}"), Color::Yellow),
        Phase::Connecting => (format!("{spin} connecting to the gateway"), Color::Yellow),
        Phase::Linked { since } => (format!("linked · up {}", duration(since.elapsed())), Color::Green),
        Phase::Retrying(why) => (format!("{spin} link down, retrying: {why}"), Color::Red),
        Phase::Direct => ("registered (direct mode)".into(), Color::Green),
        Phase::Draining => (format!("{spin} draining: finishing in-flight requests"), Color::Yellow),
        Phase::Refused(why) => (format!("refused by the gateway: {why}"), Color::Red),
        Phase::Stopped => ("stopped".into(), Color::DarkGray),
    }
}

pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

fn clock(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}

/// Draws the splash while engines load, the dashboard after.
pub fn draw(frame: &mut Frame, view: &View) {
    if matches!(view.snapshot.phase, Phase::Loading(_)) {
        splash(frame, view);
    } else {
        dashboard(frame, view);
    }
}

fn splash(frame: &mut Frame, view: &View) {
    let area = frame.area();
    let width = area.width.clamp(20, 70);
    let height = 7.min(area.height);
    let boxed = Rect {
        x: area.x + (area.width.saturating_sub(width)) / 2,
        y: area.y + (area.height.saturating_sub(height)) / 2,
        width: width.min(area.width),
        height,
    };
    let (text, color) = phase_line(&view.snapshot.phase, view.tick);
    let lines = vec![
        Line::from(Span::styled(text, Style::default().fg(color))),
        Line::from(""),
        Line::from(view.facts.hardware.clone()),
        Line::from(format!("gateway {}", view.facts.gateway)),
    ];
    frame.render_widget(Clear, boxed);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .alignment(Alignment::Center)
            .block(Block::default().borders(Borders::ALL).title(" cxmpute provider ")),
        boxed,
    );
}

fn dashboard(frame: &mut Frame, view: &View) {
    let s = view.snapshot;
    let [header, middle, activity, errors, keys] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(5),
        Constraint::Length(5),
        Constraint::Length(4),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let (phase, color) = phase_line(&s.phase, view.tick);
    let head = vec![
        Line::from(vec![
            Span::styled(phase, Style::default().fg(color).add_modifier(Modifier::BOLD)),
            Span::raw(format!("  →  {}", view.facts.gateway)),
        ]),
        Line::from(format!("{} · {}", view.facts.tier, view.facts.hardware)),
    ];
    let title = format!(" cxmpute provider · {} ", view.facts.device_name);
    frame.render_widget(
        Paragraph::new(head)
            .wrap(Wrap { trim: true })
            .block(Block::default().borders(Borders::ALL).title(title)),
        header,
    );

    let [services, earnings] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(middle);
    let serving = match s.phase {
        Phase::Linked { .. } | Phase::Direct => "serving",
        Phase::Draining => "draining",
        Phase::Stopped | Phase::Refused(_) => "stopped",
        _ => "ready",
    };
    let fetching = s.fetching.iter().map(|(service, model, progress)| {
        Row::new(vec![
            Cell::from(service.clone()),
            Cell::from(format!("{model} · {progress}")),
            Cell::from("fetching"),
        ])
        .style(Style::default().fg(Color::Yellow))
    });
    let rows: Vec<Row> = s
        .offers
        .iter()
        .map(|(service, model)| {
            Row::new(vec![
                Cell::from(service.clone()),
                Cell::from(model.clone()),
                Cell::from(serving),
            ])
        })
        .chain(fetching)
        .collect();
    frame.render_widget(
        Table::new(
            rows,
            [Constraint::Length(11), Constraint::Min(10), Constraint::Length(8)],
        )
        .header(Row::new(vec!["service", "model", "state"]).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::default().borders(Borders::ALL).title(" assigned services ")),
        services,
    );

    let mut money = match &s.earnings {
        Some(e) => vec![
            Line::from(format!("today     {}", usd(e.today_reward))),
            Line::from(format!("          {} requests", e.today_requests)),
            Line::from(format!("all time  {}", usd(e.all_time_reward))),
        ],
        None => vec![Line::from("waiting for the gateway…")],
    };
    if let Some(age) = view.earnings_age {
        money.push(Line::from(Span::styled(
            format!("updated {} ago", duration(age)),
            Style::default().fg(Color::DarkGray),
        )));
    }
    if let Some(err) = &s.earnings_error {
        money.push(Line::from(Span::styled(err.clone(), Style::default().fg(Color::Red))));
    }
    frame.render_widget(
        Paragraph::new(money)
            .wrap(Wrap { trim: true })
            .block(Block::default().borders(Borders::ALL).title(" earnings ")),
        earnings,
    );

    let [numbers, spark] = Layout::horizontal([Constraint::Length(44), Constraint::Min(10)]).areas(activity);
    let stats = vec![
        Line::from(format!("served {:>7}   failed {:>5}", s.served, s.failed)),
        Line::from(format!(
            "in flight {:>4}   tokens/s {:>7.1}",
            s.in_flight, view.tokens_per_sec
        )),
        Line::from(format!("tokens out {:>9}", s.tokens_out)),
    ];
    frame.render_widget(
        Paragraph::new(stats).block(Block::default().borders(Borders::ALL).title(" activity ")),
        numbers,
    );
    frame.render_widget(
        Sparkline::default()
            .data(view.history)
            .style(Style::default().fg(Color::Cyan))
            .block(Block::default().borders(Borders::ALL).title(" requests/s ")),
        spark,
    );

    let recent: Vec<Line> = if s.errors.is_empty() {
        vec![Line::from(Span::styled("none", Style::default().fg(Color::DarkGray)))]
    } else {
        s.errors
            .iter()
            .rev()
            .map(|(t, m)| Line::from(format!("{} {m}", clock(*t))))
            .collect()
    };
    frame.render_widget(
        Paragraph::new(recent)
            .wrap(Wrap { trim: true })
            .block(Block::default().borders(Borders::ALL).title(" recent errors ")),
        errors,
    );
    frame.render_widget(
        Paragraph::new(" q quit (drains first) · r refresh earnings").style(Style::default().fg(Color::DarkGray)),
        keys,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;
    use crate::status::Earnings;

    fn snapshot(phase: Phase) -> Snapshot {
        Snapshot {
            phase,
            offers: vec![
                ("chat".into(), "gemma-3-270m".into()),
                ("speech".into(), "piper-en-us-joe-medium".into()),
            ],
            fetching: vec![("embeddings".into(), "house-embed".into(), "42%".into())],
            served: 42,
            failed: 1,
            in_flight: 2,
            tokens_out: 900,
            errors: vec![(SystemTime::UNIX_EPOCH, "link failed; retrying".into())],
            earnings: Some(Earnings {
                today_reward: 1_500_000,
                today_requests: 42,
                all_time_reward: 2_000_000_000,
            }),
            earnings_error: None,
        }
    }

    fn render(width: u16, height: u16, snap: &Snapshot) -> String {
        let facts = NodeFacts {
            gateway: "http://127.0.0.1:8080".into(),
            device_name: "test-box".into(),
            tier: "Tier 0 · Basic".into(),
            hardware: "Test CPU · 2 threads · 8.0 GiB RAM · GPU: none".into(),
        };
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
        let view = View {
            facts: &facts,
            snapshot: snap,
            tokens_per_sec: 12.5,
            history: &[0, 1, 3, 2],
            earnings_age: Some(Duration::from_secs(7)),
            tick: 0,
        };
        terminal.draw(|f| draw(f, &view)).expect("draw");
        let buffer = terminal.backend().buffer().clone();
        let mut text = String::new();
        for y in 0..buffer.area.height {
            for x in 0..buffer.area.width {
                text.push_str(buffer[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    #[test]
    fn dashboard_shows_link_services_counters_earnings_and_errors() {
        let snap = snapshot(Phase::Linked { since: Instant::now() });
        let text = render(100, 30, &snap);
        for want in [
            "linked",
            "test-box",
            "Tier 0",
            "gemma-3-270m",
            "piper-en-us-joe-medium",
            "serving",
            "house-embed · 42%",
            "fetching",
            "served      42",
            "tokens/s    12.5",
            "$0.001500",
            "$2.000000",
            "link failed; retrying",
            "q quit",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn loading_shows_the_splash_with_the_step() {
        let snap = snapshot(Phase::Loading("loading the chat model".into()));
        let text = render(80, 24, &snap);
        assert!(text.contains("loading the chat model"), "{text}");
        assert!(!text.contains("assigned services"), "{text}");
    }

    #[test]
    fn tiny_and_huge_terminals_do_not_panic() {
        let snap = snapshot(Phase::Retrying("connection refused".into()));
        for (w, h) in [(1, 1), (10, 3), (40, 12), (300, 100)] {
            render(w, h, &snap);
        }
        let text = render(120, 30, &snap);
        assert!(text.contains("retrying: connection refused"), "{text}");
    }
}
