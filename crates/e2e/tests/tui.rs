//! The provider's terminal UI in a real terminal (tmux): the first-run setup
//! form, then the live dashboard of a node linked to a real gateway, which
//! counts a request it served and shows the earnings the gateway reports; a
//! resize redraws; `q` drains and exits 0; the answers are in the config file.
//!
//! Needs tmux; without it the test passes with a loud SKIP message, unless
//! CXMPUTE_REQUIRE_MODELS is set (CI), when it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use common::{bin, present_or_skip, Db, Gateway};
use cxmpute_testkit::FakeUpstream;
use serde_json::json;

/// One tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = StdCommand::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "node"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "node"])
    }

    /// Waits until the pane shows every one of `wants`; returns the screen.
    async fn wait_for(&self, wants: &[&str], timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if wants.iter().all(|w| screen.contains(w)) {
                return screen;
            }
            assert!(
                started.elapsed() < timeout,
                "the pane did not show {wants:?} within {timeout:?}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = StdCommand::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[tokio::test]
async fn setup_form_then_dashboard_in_a_real_terminal() {
    let tmux_ok = StdCommand::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present_or_skip(tmux_ok, "tmux", "Install tmux to test the terminal UI.") {
        return;
    }
    let upstream = FakeUpstream::start().await.unwrap();
    let db = Db::sqlite().await;
    let gw = Gateway::start(&db.url).await;
    let (_, cred) = gw.device().await;
    let home = tempfile::tempdir().unwrap();
    let config_home = home.path().join("config");

    let command = format!(
        "env XDG_CONFIG_HOME={} CXMPUTE_CREDENTIAL={} CXMPUTE_MODELS_DIR={} {} start --gateway {} \
         --upstream {} --no-chat --no-embeddings --no-speech",
        shell_quote(&config_home.display().to_string()),
        shell_quote(&cred),
        shell_quote(&home.path().join("models").display().to_string()),
        shell_quote(&bin("cxmpute-provider").display().to_string()),
        shell_quote(&gw.url),
        shell_quote(&upstream.base_url),
    );
    // The shell records the node's exit status in a file: tmux's own
    // `pane_dead_status` is not always filled in when the pane closes.
    let exit_file = home.path().join("exit-status");
    let command = format!("{command}; echo $? > {}", shell_quote(&exit_file.display().to_string()));
    let tmux = Tmux {
        socket: format!("cxmpute-e2e-{}", std::process::id()),
    };
    // The pane stays after the node exits, so its last screen can be read.
    tmux.run(&[
        "-f",
        "/dev/null",
        "new-session",
        "-d",
        "-s",
        "node",
        "-x",
        "110",
        "-y",
        "32",
        &command,
        ";",
        "set-window-option",
        "-t",
        "node",
        "remain-on-exit",
        "on",
    ]);

    // First run: the setup form, prefilled from the flags (chat off).
    let form = tmux
        .wait_for(
            &["Set up this node", "Device name", "Save and start"],
            Duration::from_secs(30),
        )
        .await;
    assert!(form.contains("[ ]"), "chat should start unticked:\n{form}");
    tmux.keys(&["-l", "_tmux"]);
    tmux.keys(&["Tab"]);
    tmux.keys(&["-l", "NL"]);
    tmux.keys(&["Tab", "Tab"]);
    tmux.keys(&["-l", "Delft"]);
    // Shift-Tab from the city goes back up and wraps to "Save and start".
    for _ in 0..4 {
        tmux.keys(&["BTab"]);
    }
    tmux.keys(&["Enter"]);

    // The dashboard: linked, with the upstream's models assigned.
    let screen = tmux
        .wait_for(
            &["linked", "assigned services", "fake-chat", "serving"],
            Duration::from_secs(60),
        )
        .await;
    assert!(screen.contains("_tmux"), "device name in the title:\n{screen}");
    assert!(screen.contains("served       0"), "nothing served yet:\n{screen}");
    gw.wait_providers("fake-chat", 1, Duration::from_secs(10)).await;

    // A request through the gateway shows up as served, and after a refresh
    // (`r`) the gateway's figure for today counts it.
    let (_, key) = gw.account(1_000_000_000_000, json!({"name": "t"})).await;
    let res = gw
        .post("/v1/chat/completions", &key)
        .json(&json!({"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    tmux.wait_for(&["served       1"], Duration::from_secs(10)).await;
    let mut refreshed = String::new();
    for _ in 0..20 {
        tmux.keys(&["r"]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        refreshed = tmux.screen();
        if refreshed.contains("1 requests") {
            break;
        }
    }
    assert!(refreshed.contains("1 requests"), "earnings today:\n{refreshed}");

    // A smaller terminal redraws the whole dashboard.
    tmux.run(&["resize-window", "-t", "node", "-x", "80", "-y", "24"]);
    tmux.wait_for(&["linked", "q quit"], Duration::from_secs(10)).await;

    // q drains and exits cleanly.
    tmux.keys(&["q"]);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = std::fs::read_to_string(&exit_file).ok().filter(|s| s.ends_with('\n')) {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the node did not exit within 30 s of q:\n{}",
            tmux.screen()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.trim(), "0", "the node's exit status after q:\n{}", tmux.screen());
    gw.wait_providers("fake-chat", 0, Duration::from_secs(10)).await;

    // The answers were saved, without the credential.
    let saved = std::fs::read_to_string(config_home.join("cxmpute/node.toml")).unwrap();
    assert!(
        saved.contains("_tmux\"") && saved.contains("country = \"NL\"") && saved.contains("city = \"Delft\""),
        "{saved}"
    );
    assert!(!saved.contains(&cred) && !saved.contains("credential ="), "{saved}");
    assert!(Path::new(&config_home.join("cxmpute/node.log")).is_file());
}
