//! A real SMTP server for the tests that log in by mail, and the bits of a
//! browser they need (cookies, the form's CSRF field).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// `python3 -m aiosmtpd` writing every message into `dir` (a maildir).
pub struct SmtpServer {
    _child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl SmtpServer {
    pub async fn start(dir: &Path) -> SmtpServer {
        let probe = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .status()
            .await
            .expect("python3 is needed for this test");
        assert!(
            probe.success(),
            "this test needs Python's aiosmtpd: pip install aiosmtpd (scripts/test.sh does)"
        );
        // A maildir: Python's Maildir creates its subfolders only for a new folder.
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // A free loopback port: bind, read, release. aiosmtpd cannot report
        // the port it picked itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start aiosmtpd");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "aiosmtpd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        SmtpServer {
            _child: child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// Waits for a message to `to` and returns its text.
    pub async fn message_to(&self, to: &str) -> String {
        let started = Instant::now();
        loop {
            if let Ok(entries) = std::fs::read_dir(self.dir.join("new")) {
                for entry in entries.flatten() {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    if text.lines().any(|l| l.starts_with("To:") && l.contains(to)) {
                        return text;
                    }
                }
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no mail to {to} arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The six-digit code in the message's subject.
pub fn code_in(message: &str) -> String {
    let subject = message
        .lines()
        .find(|l| l.starts_with("Subject:"))
        .expect("a subject line");
    let code: String = subject.chars().filter(char::is_ascii_digit).collect();
    assert_eq!(code.len(), 6, "{subject}");
    code
}

/// `name=value` of a `Set-Cookie` header for `name`.
pub fn set_cookie(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|kv| kv.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

/// The value of the hidden `csrf` field of a page.
pub fn csrf_field(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    page[at..].chars().take_while(|c| *c != '"').collect()
}
