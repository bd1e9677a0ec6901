//! What the job shows of itself: loss curves, the running line and the
//! periodic summary.

use std::time::Duration;

use super::Job;

/// Most points kept of a task's loss curve: past it, every other point is
/// dropped, so a long run keeps its whole shape at a bounded cost.
pub const CURVE_POINTS: usize = 400;

impl Job {
    /// What each worker is doing, on one line: `worker: task epoch e/n
    /// loss l`, comma-separated.
    pub fn running_line(&self) -> String {
        let running: Vec<String> = self
            .workers
            .iter()
            .filter_map(|(id, w)| {
                let (task, _) = w.task.as_ref()?;
                Some(match w.progress.as_ref() {
                    Some(p) if p.epochs > 0 => format!(
                        "{id}: {task} epoch {}/{} loss {:.4}",
                        p.epoch, p.epochs, p.loss
                    ),
                    _ => format!("{id}: {task}"),
                })
            })
            .collect();
        running.join(", ")
    }

    /// A one-line summary for the periodic log.
    pub fn summary_line(&self, now: Duration) -> String {
        let c = self.scheduler.counts();
        format!(
            "tasks done {}/{} (running {}, ready {}, blocked {}, failed {}); workers alive {}; {}",
            c.done,
            self.scheduler.len(),
            c.running,
            c.ready,
            c.blocked,
            c.failed,
            self.workers_alive(now),
            self.running_line()
        )
    }

    /// Adds a point to task `id`'s loss curve.
    pub(super) fn add_curve_point(&mut self, id: &str, point: [f64; 2]) {
        add_curve_point(self.curves.entry(id.to_string()).or_default(), point);
    }
}

/// Appends `point` to `curve`, thinning it past [`CURVE_POINTS`].
fn add_curve_point(curve: &mut Vec<[f64; 2]>, point: [f64; 2]) {
    if curve.last().is_some_and(|last| last[0] >= point[0]) {
        return; // the same step again (or an older attempt's)
    }
    curve.push(point);
    if curve.len() > CURVE_POINTS {
        let mut keep = false;
        curve.retain(|_| {
            keep = !keep;
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_curves_keep_their_shape_within_a_bounded_size() {
        let mut curve = Vec::new();
        for step in 1..=5000u32 {
            add_curve_point(&mut curve, [f64::from(step), 1.0 / f64::from(step)]);
        }
        add_curve_point(&mut curve, [10.0, 9.0]);
        assert!(curve.len() <= CURVE_POINTS && curve.len() > CURVE_POINTS / 2);
        assert_eq!(curve[0], [1.0, 1.0], "the start is kept");
        assert!(
            curve.windows(2).all(|w| w[0][0] < w[1][0]),
            "steps only go up"
        );
        assert!(curve.last().unwrap()[0] > 4900.0, "the end is kept");
    }
}
