//! `--local-workers N`: worker processes started by the coordinator itself
//! on loopback, for one-machine jobs. They are the `worker` binary beside the
//! coordinator's own executable, and they die with the coordinator: killed
//! when it drops them, and (on Linux) sent SIGKILL by the kernel if the
//! coordinator itself dies.

use std::path::{Path, PathBuf};

use anyhow::Context;
use common::logging::LogFormat;
use proto::auth::{Token, TOKEN_ENV};
use tokio::process::{Child, Command};

/// The running local workers.
#[derive(Debug)]
pub struct LocalWorkers {
    children: Vec<Child>,
}

/// The `worker` executable beside this process's executable.
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the coordinator's own executable")?;
    let path = me.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        path.is_file(),
        "--local-workers needs the `worker` binary beside the coordinator, at {} (build it with `cargo build -p worker`)",
        path.display()
    );
    Ok(path)
}

/// The device arguments of local worker `i`: `--gpu N` round-robin over
/// `gpus`, or `--cpu` when there are none.
fn device_args(i: usize, gpus: &[usize]) -> Vec<String> {
    match gpus.get(i % gpus.len().max(1)) {
        Some(gpu) => vec!["--gpu".into(), gpu.to_string()],
        None => vec!["--cpu".into()],
    }
}

impl LocalWorkers {
    /// Starts `count` workers with `threads` compute threads each, on the
    /// CPU or, when `gpus` lists any, worker `i` on GPU `gpus[i % len]`;
    /// talking to `coordinator` with `token` (over TLS trusting `tls_ca`
    /// when given), logging in `log_format`, with scratch folders under
    /// `scratch_root`.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        count: usize,
        threads: usize,
        gpus: &[usize],
        log_format: LogFormat,
        coordinator: &str,
        token: Option<&Token>,
        tls_ca: Option<&Path>,
        scratch_root: &Path,
    ) -> anyhow::Result<Self> {
        let binary = worker_binary()?;
        let mut children = Vec::with_capacity(count);
        for i in 0..count {
            let mut cmd = Command::new(&binary);
            cmd.args(device_args(i, gpus))
                .arg("--coordinator")
                .arg(coordinator)
                .arg("--threads")
                .arg(threads.to_string())
                .arg("--scratch")
                .arg(scratch_root.join(format!("worker-{i}")))
                .arg("--give-up-after")
                .arg("30")
                .arg("--log-format")
                .arg(log_format.as_str())
                .kill_on_drop(true);
            if let Some(ca) = tls_ca {
                cmd.arg("--tls-ca").arg(ca);
            }
            // The environment, not the command line: other users can read
            // a process's arguments.
            match token {
                Some(token) => cmd.env(TOKEN_ENV, token.expose()),
                None => cmd.env_remove(TOKEN_ENV),
            };
            let bars = common::logging::progress_bars();
            if bars.is_some() {
                // A terminal with progress bars: the workers' lines go above
                // them, and only their warnings unless RUST_LOG says more.
                cmd.stderr(std::process::Stdio::piped());
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "warn");
                }
            }
            die_with_parent(&mut cmd);
            let mut child = cmd
                .spawn()
                .with_context(|| format!("cannot start {}", binary.display()))?;
            if let (Some(bars), Some(stderr)) = (bars, child.stderr.take()) {
                tokio::spawn(async move {
                    use tokio::io::AsyncBufReadExt;
                    let mut lines = tokio::io::BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        bars.suspend(|| eprintln!("{line}"));
                    }
                });
            }
            tracing::info!(pid = child.id(), index = i, "local worker started");
            children.push(child);
        }
        Ok(LocalWorkers { children })
    }

    /// How many of them are still running.
    pub fn running(&mut self) -> usize {
        let mut running = 0;
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                running += 1;
            }
        }
        running
    }

    /// Sends SIGTERM to the workers still running: each gives its task
    /// back (after a checkpoint) and exits.
    pub fn terminate(&self) {
        for child in &self.children {
            if let Some(pid) = child.id() {
                // SAFETY: kill has no memory-safety preconditions; the pid is
                // our own child's, not yet reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
    }

    /// Waits up to `grace` for them to exit on their own, then kills the rest.
    pub async fn finish(mut self, grace: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        for child in &mut self.children {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// Has the kernel SIGKILL the child when its parent dies. PDEATHSIG fires
/// when the *thread* that forked exits: `coordinator` spawns from its main
/// thread (the runtime's `block_on`), which lives as long as the process.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child's own
    // process attributes between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::device_args;

    #[test]
    fn workers_share_the_gpus_round_robin_or_run_on_the_cpu() {
        let on = |i, gpus: &[usize]| device_args(i, gpus).join(" ");
        assert_eq!(on(0, &[]), "--cpu");
        assert_eq!(on(3, &[]), "--cpu");
        assert_eq!(on(0, &[2, 5]), "--gpu 2");
        assert_eq!(on(1, &[2, 5]), "--gpu 5");
        assert_eq!(on(2, &[2, 5]), "--gpu 2");
    }
}
