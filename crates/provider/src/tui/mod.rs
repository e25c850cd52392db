//! The terminal UI of `cxmpute-provider start` (without `--headless`): a setup
//! wizard on first run, a splash while models load, then a live dashboard.
//!
//! - [`wizard`]: the first-run form (saved as the config file).
//! - [`dashboard`]: splash and dashboard drawing, pure over a status snapshot.
//!
//! The terminal is put back (raw mode off, main screen) when the UI ends,
//! including on panic. Logs go to a file while the UI owns the screen.

pub mod dashboard;
pub mod wizard;

use std::collections::VecDeque;
use std::io::{self, Stdout};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::Terminal;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::diagnose::Report;
use crate::status::{self, Earnings, NodeStatus};
use dashboard::{NodeFacts, View};
use wizard::{Outcome, Wizard};

type Term = Terminal<CrosstermBackend<Stdout>>;

/// Owns the terminal while it lives; puts it back when dropped.
struct Screen {
    terminal: Term,
}

impl Screen {
    fn enter() -> anyhow::Result<Self> {
        install_panic_hook();
        enable_raw_mode().context("cannot switch the terminal to raw mode")?;
        let mut stdout = io::stdout();
        execute!(stdout, EnterAlternateScreen).context("cannot open the alternate screen")?;
        let terminal = Terminal::new(CrosstermBackend::new(stdout)).context("cannot start the terminal UI")?;
        Ok(Self { terminal })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
        let _ = self.terminal.show_cursor();
    }
}

fn restore_terminal() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen);
}

/// Restores the terminal before the default panic message is printed, so a
/// panic is readable and the shell is usable afterwards.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// Runs the first-run form. `Ok(true)` when the person saved (and `config`
/// now holds the answers), `Ok(false)` when they cancelled.
pub fn run_wizard(config: &mut NodeConfig, default_name: &str) -> anyhow::Result<bool> {
    let mut screen = Screen::enter()?;
    let mut form = Wizard::new(config, default_name);
    loop {
        screen
            .terminal
            .draw(|f| form.draw(f))
            .context("drawing the setup form")?;
        if let Event::Key(key) = event::read().context("reading the keyboard")? {
            if key.kind != KeyEventKind::Press {
                continue;
            }
            match form.key(key) {
                Outcome::Editing => {}
                Outcome::Done => {
                    form.apply(config);
                    return Ok(true);
                }
                Outcome::Cancelled => return Ok(false),
            }
        }
    }
}

/// One line about the machine, from its diagnose report.
pub fn facts(config: &NodeConfig, report: &Report) -> NodeFacts {
    let gib = |b: Option<u64>| b.map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64));
    let gpu = report
        .gpus
        .first()
        .map(|g| match gib(g.vram_total_bytes) {
            Some(v) => format!("{} ({v})", g.name),
            None => g.name.clone(),
        })
        .unwrap_or_else(|| "none".into());
    let hardware = format!(
        "{} · {} threads · {} RAM · GPU: {gpu}",
        report.cpu.model.as_deref().unwrap_or("unknown CPU"),
        report.cpu.threads.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
        gib(report.memory.total_bytes).unwrap_or_else(|| "?".into()),
    );
    NodeFacts {
        gateway: config.gateway.clone(),
        device_name: config.device_name.clone().unwrap_or_else(|| "this device".into()),
        tier: format!("Tier {} · {}", report.tier.level, report.tier.name),
        hardware,
    }
}

/// Draws the dashboard until `done` is cancelled (the node stopped). `q` or
/// Ctrl-C cancels `stop` (the node drains, the dashboard shows it); `r` asks
/// for fresh earnings. Runs on its own thread: reading keys blocks.
pub fn spawn_dashboard(
    facts: NodeFacts,
    stop: CancellationToken,
    done: CancellationToken,
    refresh: Arc<tokio::sync::Notify>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        let mut screen = Screen::enter()?;
        let status = status::global().clone();
        let mut meter = Meter::new(&status);
        let mut tick = 0u64;
        while !done.is_cancelled() {
            meter.sample(&status);
            let snapshot = status.snapshot();
            let history: Vec<u64> = meter.history.iter().copied().collect();
            let view = View {
                facts: &facts,
                snapshot: &snapshot,
                tokens_per_sec: meter.tokens_per_sec(),
                history: &history,
                earnings_age: meter.earnings_at.map(|t| t.elapsed()),
                tick,
            };
            screen
                .terminal
                .draw(|f| dashboard::draw(f, &view))
                .context("drawing the dashboard")?;
            tick += 1;
            if event::poll(Duration::from_millis(250)).context("reading the keyboard")? {
                match event::read().context("reading the keyboard")? {
                    Event::Key(k) if k.kind == KeyEventKind::Press => match k.code {
                        KeyCode::Char('q') => stop.cancel(),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => stop.cancel(),
                        KeyCode::Char('r') => refresh.notify_one(),
                        _ => {}
                    },
                    // The next draw uses the new size.
                    Event::Resize(_, _) => screen.terminal.autoresize().context("resizing")?,
                    _ => {}
                }
            }
            if snapshot.earnings.is_some() && meter.earnings_seen != snapshot.earnings {
                meter.earnings_seen = snapshot.earnings.clone();
                meter.earnings_at = Some(Instant::now());
            }
        }
        Ok(())
    })
}

/// Turns counters into rates for the dashboard.
struct Meter {
    last: Instant,
    last_tokens: u64,
    last_done: u64,
    /// (seconds, tokens) over the last few samples.
    window: VecDeque<(f64, u64)>,
    history: VecDeque<u64>,
    earnings_seen: Option<Earnings>,
    earnings_at: Option<Instant>,
}

impl Meter {
    fn new(status: &NodeStatus) -> Self {
        let s = status.snapshot();
        Self {
            last: Instant::now(),
            last_tokens: s.tokens_out,
            last_done: s.served + s.failed,
            window: VecDeque::new(),
            history: VecDeque::new(),
            earnings_seen: None,
            earnings_at: None,
        }
    }

    fn sample(&mut self, status: &NodeStatus) {
        if self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        let s = status.snapshot();
        let secs = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        self.window.push_back((secs, s.tokens_out - self.last_tokens));
        if self.window.len() > 5 {
            self.window.pop_front();
        }
        self.last_tokens = s.tokens_out;
        let done = s.served + s.failed;
        self.history.push_back(done - self.last_done);
        if self.history.len() > 120 {
            self.history.pop_front();
        }
        self.last_done = done;
    }

    fn tokens_per_sec(&self) -> f64 {
        let (secs, tokens) = self
            .window
            .iter()
            .fold((0.0, 0u64), |(s, t), (ds, dt)| (s + ds, t + dt));
        if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        }
    }
}

/// Asks the gateway for this device's earnings every `every`, or when
/// `refresh` is notified, until `stop` is cancelled.
pub async fn poll_earnings(
    gateway: String,
    credential: String,
    every: Duration,
    refresh: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let Ok(http) = crate::gateway_tls::http_client(Duration::from_secs(10)) else {
        return;
    };
    let url = format!("{}/v1/provider/stats", gateway.trim_end_matches('/'));
    loop {
        let result = async {
            let res = http
                .get(&url)
                .bearer_auth(&credential)
                .send()
                .await
                .map_err(|e| format!("earnings: cannot reach the gateway ({e})"))?;
            let status = res.status();
            if !status.is_success() {
                return Err(format!("earnings: the gateway answered {status}"));
            }
            res.json::<Earnings>()
                .await
                .map_err(|e| format!("earnings: unexpected answer ({e})"))
        }
        .await;
        status::global().set_earnings(result);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = refresh.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}
