//! Graceful stop on SIGTERM (what Kubernetes sends before it kills a pod)
//! or Ctrl-C. The first signal makes the worker *stop*: it leases nothing
//! more, a training task ends at its next epoch end after uploading a
//! checkpoint there, other tasks (short) run to their end, and the task is
//! given back to the coordinator without counting as a failed attempt.
//! After the grace period, or at a second signal, the worker *abandons* the
//! task at the next step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The worker's stop state, shared by the signal listener, the lease loop
/// and the compute thread.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    inner: Arc<Flags>,
}

#[derive(Debug, Default)]
struct Flags {
    stopping: AtomicBool,
    abandon: AtomicBool,
}

impl Shutdown {
    /// True once a stop was asked for.
    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Relaxed)
    }

    /// True once the running task must be abandoned at the next step.
    pub fn must_abandon(&self) -> bool {
        self.inner.abandon.load(Ordering::Relaxed)
    }

    /// Asks for a graceful stop.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// Asks to abandon the running task now.
    pub fn abandon(&self) {
        self.stop();
        self.inner.abandon.store(true, Ordering::Relaxed);
    }

    /// Listens for SIGTERM and Ctrl-C on the current runtime: the first
    /// stops, and `grace` later (or at the next signal) the task is
    /// abandoned.
    pub fn listen(&self, grace: Duration) -> anyhow::Result<()> {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = self.clone();
        tokio::spawn(async move {
            let signal = async {
                tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = tokio::signal::ctrl_c() => "Ctrl-C",
                }
            };
            let name = signal.await;
            tracing::warn!(
                grace_seconds = grace.as_secs_f64(),
                "{name}: stopping after the current epoch (with a checkpoint) or task"
            );
            shutdown.stop();
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::warn!("abandoning the running task");
            shutdown.abandon();
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoning_implies_stopping() {
        let s = Shutdown::default();
        assert!(!s.stopping() && !s.must_abandon());
        s.stop();
        assert!(s.stopping() && !s.must_abandon());
        let t = s.clone();
        t.abandon();
        assert!(s.stopping() && s.must_abandon(), "clones share the state");
    }
}
