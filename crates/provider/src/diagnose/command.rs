//! Runs a probe program and returns its standard output, or `None` when it is missing,
//! fails, or outlives its deadline.
//!
//! A hung driver tool (nvidia-smi waiting on a wedged GPU is a classic) must not hang
//! `diagnose`, so output is read on a helper thread and the child is killed at the
//! deadline.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Deadline for quick tools (nvidia-smi, rocm-smi, sysctl).
pub const QUICK: Duration = Duration::from_secs(5);
/// Deadline for slow starters (PowerShell, system_profiler).
pub const SLOW: Duration = Duration::from_secs(15);

/// Probe outputs larger than this are not something we know how to parse.
const MAX_OUTPUT: u64 = 4 << 20;

pub fn output(program: &str, args: &[&str], deadline: Duration) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let read = (&mut stdout).take(MAX_OUTPUT).read_to_end(&mut buf);
        let _ = tx.send(read.map(|_| buf));
    });
    let end = Instant::now() + deadline;
    let answer = match rx.recv_timeout(deadline) {
        // The pipe closed; the exit status says whether the output is an answer or an
        // error message.
        Ok(Ok(buf)) => exit_status_by(&mut child, end)
            .filter(|s| s.success())
            .map(|_| String::from_utf8_lossy(&buf).into_owned()),
        _ => None,
    };
    if answer.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    answer
}

fn exit_status_by(child: &mut Child, end: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn returns_stdout_of_a_successful_program() {
        assert_eq!(output("sh", &["-c", "echo hi"], QUICK).as_deref(), Some("hi\n"));
    }

    #[test]
    fn missing_or_failing_programs_are_none() {
        assert_eq!(output("cxmpute-no-such-program", &[], QUICK), None);
        assert_eq!(output("sh", &["-c", "echo partial; exit 3"], QUICK), None);
    }

    #[test]
    fn a_hung_program_is_killed_at_the_deadline() {
        let started = Instant::now();
        assert_eq!(output("sleep", &["30"], Duration::from_millis(200)), None);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
