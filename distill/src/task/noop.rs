//! A task that does nothing: load tests of the coordinator use it. Its
//! output is its index as 8 little-endian bytes.

use serde::{Deserialize, Serialize};

use common::artifact::ArtifactName;

use super::{Checked, JobLayout, Run, TaskKind, TaskOutput};
use crate::Result;

/// A task that does nothing (for load tests).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopTask {
    /// Its number in the plan.
    pub index: u64,
}

impl NoopTask {
    /// Its task id (and the name of its output), such as `noop-0000003`.
    pub fn id(&self) -> String {
        format!("noop-{:07}", self.index)
    }

    /// The result a no-op task must deliver.
    pub fn payload(&self) -> Vec<u8> {
        self.index.to_le_bytes().to_vec()
    }
}

impl TaskKind for NoopTask {
    /// Nothing.
    fn inputs(&self, _: &JobLayout<'_>) -> Vec<ArtifactName> {
        Vec::new()
    }

    fn output(&self) -> ArtifactName {
        ArtifactName::Noop(self.id())
    }

    /// Its index, as [`NoopTask::payload`].
    fn check_output(&self, payload: &[u8], _: usize) -> Result<Checked, String> {
        if payload != self.payload() {
            return Err("not this no-op task's index".into());
        }
        Ok(Checked::Noop)
    }

    fn run(&self, _: Run<'_>) -> Result<TaskOutput> {
        Ok(TaskOutput {
            payload: self.payload(),
            summary: serde_json::Value::Null,
        })
    }
}
