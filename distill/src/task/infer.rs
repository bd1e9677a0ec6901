//! Teacher inference over one range of the training split: each teacher's
//! logits, and with specialists the generalist+specialists distribution of
//! eq. 5 (as logits `ln q`). The output is one transfer-set shard.

use std::time::Instant;

use common::artifact::ArtifactName;
use common::transfer::{
    check_encoded_shard, encode_shard, soft_targets, Encoding, EnsembleCombine, ShardLogits,
};
use serde::{Deserialize, Serialize};

use super::combined::{models_and_combination, CombinedModels, CombinedSpec};
use super::{
    dataset_inputs, load_model, tick, Checked, JobLayout, Run, TaskKind, TaskOutput, TimedSummary,
};
use crate::specialists::ensemble::log_probabilities;
use crate::Result;
use common::dataset::shard::Split;

/// Teacher inference over examples `start..end` of the training split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferTask {
    /// Shard number in the transfer set.
    pub shard: usize,
    /// First example (inclusive).
    pub start: usize,
    /// Last example (exclusive).
    pub end: usize,
    /// The teachers, in the transfer set's order.
    pub teachers: Vec<String>,
    /// Also store the generalist+specialists distribution q, as logits
    /// `ln q` under the combination's name, after the teachers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combined: Option<CombinedSpec>,
}

impl InferTask {
    /// The transfer set's columns it writes, in order: the teachers, then
    /// the combination.
    pub fn columns(&self) -> Vec<String> {
        let mut names = self.teachers.clone();
        names.extend(self.combined.as_ref().map(|c| c.name.clone()));
        names
    }
}

impl TaskKind for InferTask {
    /// The dataset, the teachers, and what the combination needs besides
    /// them.
    fn inputs(&self, job: &JobLayout<'_>) -> Vec<ArtifactName> {
        let shards = job.dataset.overlapping(Split::Train, self.start..self.end);
        let mut inputs = dataset_inputs(job.dataset, shards, false, false);
        inputs.extend(models_and_combination(
            &self.teachers,
            self.combined.as_ref(),
        ));
        inputs
    }

    fn output(&self) -> ArtifactName {
        ArtifactName::Shard(self.shard)
    }

    /// Must be an encoded shard against the task and a job of `num_classes`.
    fn check_output(&self, payload: &[u8], num_classes: usize) -> Result<Checked, String> {
        check_encoded_shard(
            Encoding::DenseF32,
            self.shard,
            self.start..self.end,
            &self.columns(),
            num_classes,
            payload,
        )
        .map(Checked::Shard)
        .map_err(|e| e.to_string())
    }

    fn run(&self, run: Run<'_>) -> Result<TaskOutput> {
        let Run(inputs, device, observer) = run;
        let (train, offset) = inputs.data.train.load_range(self.start..self.end)?;
        let train = &*train;
        let rows = self.start - offset..self.end - offset;
        let started = Instant::now();
        let mut logits = Vec::with_capacity(self.teachers.len() + 1);
        for (k, name) in self.teachers.iter().enumerate() {
            let model = load_model(inputs, name, device)?;
            logits.push(model.logits_of(train, rows.clone())?);
            tick(observer, k + 1, started, rows.len() * (k + 1))?;
        }
        if let Some(combined) = &self.combined {
            let ensemble =
                CombinedModels::load(combined, inputs, device)?.into_ensemble(combined)?;
            // The generalist is usually one of the teachers: reuse its logits.
            let q = match self.teachers.iter().position(|t| *t == combined.generalist) {
                Some(k) => {
                    let classes = train.num_classes();
                    let p = soft_targets(&[&logits[k]], classes, 1.0, EnsembleCombine::Arithmetic)?;
                    let p: Vec<f64> = p.into_iter().map(f64::from).collect();
                    ensemble.combined_given(&p, train, rows.clone())?
                }
                None => ensemble.combined(train, rows.clone())?,
            };
            logits.push(log_probabilities(&q));
            tick(observer, logits.len(), started, rows.len() * logits.len())?;
        }
        let views: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
        let columns = self.columns();
        let block = ShardLogits::new(self.start, train.num_classes(), &columns, &views)?;
        let payload = encode_shard(Encoding::DenseF32, &block)?;
        let summary = TimedSummary {
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(TaskOutput::new(payload, &summary))
    }
}
