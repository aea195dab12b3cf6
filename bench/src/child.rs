//! Run a child process to the end and collect its wall time and peak resident set size.
//!
//! The child is reaped with `wait4`, whose `rusage` carries `ru_maxrss` of that child (and of its
//! own reaped children), not of everything this process ever started. A spawned child shares this
//! process's memory until it execs, and exec records that high-water mark as the child's: this
//! process must stay small ([`own_peak_rss_bytes`] is the floor under every measurement).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

/// A child that exited successfully.
#[derive(Debug)]
pub struct Finished {
    pub wall_s: f64,
    pub peak_rss_bytes: u64,
    pub stdout: String,
}

/// Run `cmd` with stdin closed, stdout captured and stderr written to `stderr_log`.
pub fn run(cmd: &mut Command, stderr_log: &Path) -> anyhow::Result<Finished> {
    let what = format!("{cmd:?}");
    let log =
        File::create(stderr_log).with_context(|| format!("creating {}", stderr_log.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let mut stdout = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        pipe.read_to_string(&mut stdout)
            .with_context(|| format!("reading the output of {what}"))?;
    }
    let pid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
    let (status, usage) = wait4(pid).with_context(|| format!("waiting for {what}"))?;
    let wall_s = start.elapsed().as_secs_f64();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let tail = std::fs::read_to_string(stderr_log).unwrap_or_default();
        let tail: Vec<&str> = tail
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "{what} failed (wait status {status}); stderr in {}:\n{}",
            stderr_log.display(),
            tail.join("\n")
        );
    }
    // Linux reports ru_maxrss in kibibytes.
    let peak_rss_bytes = u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024;
    Ok(Finished {
        wall_s,
        peak_rss_bytes,
        stdout,
    })
}

fn wait4(pid: libc::pid_t) -> std::io::Result<(libc::c_int, libc::rusage)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers point to live, writable locals of the types wait4 expects.
        let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
        if r == pid {
            return Ok((status, usage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// This process's own peak resident set size.
pub fn own_peak_rss_bytes() -> u64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer points to a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) } != 0 {
        return 0;
    }
    u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
}
