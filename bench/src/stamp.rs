//! Where and when results were produced: machine, date, commit, versions.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// The provenance written beside every result.
#[derive(Clone, Debug, Serialize)]
pub struct Stamp {
    /// Host name.
    pub host: String,
    /// CPU model (from /proc/cpuinfo).
    pub cpu: String,
    /// Logical CPUs available to the process.
    pub cpus: usize,
    /// UTC date and time the results were written.
    pub date: String,
    /// `git rev-parse HEAD`, with `-dirty` when tracked files were modified.
    pub commit: String,
    /// Our version.
    pub version: String,
    /// `rustc --version`.
    pub rustc: String,
    /// candle-core and tonic versions from Cargo.lock.
    pub candle: String,
    /// tonic version from Cargo.lock.
    pub tonic: String,
}

impl Stamp {
    /// Reads the stamp now; `workspace` is the repository root.
    pub fn now(workspace: &Path) -> Stamp {
        let lock =
            parse_lock(&std::fs::read_to_string(workspace.join("Cargo.lock")).unwrap_or_default());
        Stamp {
            host: command_line("hostname", &[], workspace).unwrap_or_else(|| "unknown".into()),
            cpu: cpu_model().unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            date: Stamp::now_date(),
            commit: commit(workspace),
            version: env!("CARGO_PKG_VERSION").into(),
            rustc: command_line("rustc", &["--version"], workspace)
                .unwrap_or_else(|| "unknown".into()),
            candle: locked_version(&lock, "candle-core"),
            tonic: locked_version(&lock, "tonic"),
        }
    }

    /// The current UTC date and time, as stamps write it.
    pub fn now_date() -> String {
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string()
    }

    /// One line for the top of a Markdown result.
    pub fn markdown(&self) -> String {
        format!(
            "{} on {} ({}, {} logical CPUs); commit `{}`; {}; candle {}, tonic {}",
            self.date,
            self.host,
            self.cpu,
            self.cpus,
            self.commit,
            self.rustc,
            self.candle,
            self.tonic
        )
    }
}

fn command_line(program: &str, args: &[&str], dir: &Path) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit(workspace: &Path) -> String {
    let Some(head) = command_line("git", &["rev-parse", "HEAD"], workspace) else {
        return "unknown".into();
    };
    let dirty = command_line(
        "git",
        &["status", "--porcelain", "--untracked-files=no"],
        workspace,
    )
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// A Cargo.lock's text as TOML (empty when it does not parse).
fn parse_lock(text: &str) -> toml::Table {
    toml::from_str(text).unwrap_or_default()
}

/// The version of package `name` in a parsed Cargo.lock.
fn locked_version(lock: &toml::Table, name: &str) -> String {
    lock.get("package")
        .and_then(|p| p.as_array())
        .and_then(|packages| {
            packages
                .iter()
                .find(|p| p.get("name").and_then(|n| n.as_str()) == Some(name))
        })
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_locked_version() {
        let lock = "version = 4\n[[package]]\nname = \"a\"\nversion = \"1.2.3\"\n\
                    [[package]]\nname = \"tonic\"\nversion = \"0.14.2\"\n";
        let lock = parse_lock(lock);
        assert_eq!(locked_version(&lock, "tonic"), "0.14.2");
        assert_eq!(locked_version(&lock, "candle-core"), "unknown");
    }
}
