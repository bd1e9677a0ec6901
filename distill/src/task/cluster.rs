//! Clustering the classes the generalist confuses (paper, section 5): its
//! predictions over the training split, their covariance, K-means. The
//! output is the specialists' classes ([`Clusters`] as JSON).

use std::time::Instant;

use common::artifact::ArtifactName;
use common::seed::{self, Stream};
use common::transfer::{soft_targets, EnsembleCombine};
use serde::{Deserialize, Serialize};

use super::{dataset_inputs, load_model, tick, Checked, JobLayout, Run, TaskKind, TaskOutput};
use crate::specialists::clustering::confusable_clusters;
use crate::specialists::ensemble::Clusters;
use crate::{Error, Result};
use common::dataset::shard::Split;

/// Which classes each specialist covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTask {
    /// The generalist model.
    pub generalist: String,
    /// Number of specialists (K-means clusters).
    pub specialists: usize,
    /// Classes per specialist (clusters may then overlap); `None`: the
    /// K-means clusters themselves, which partition the classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes_per_specialist: Option<usize>,
    /// Seed of K-means.
    pub seed: u64,
}

/// What clustering reports besides the clusters file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    /// Seconds it took.
    pub seconds: f64,
    /// The classes of each specialist.
    pub clusters: Vec<Vec<usize>>,
}

impl TaskKind for ClusterTask {
    /// The training split and the generalist.
    fn inputs(&self, job: &JobLayout<'_>) -> Vec<ArtifactName> {
        let mut inputs = dataset_inputs(job.dataset, job.dataset.all(Split::Train), false, false);
        inputs.push(ArtifactName::Model(self.generalist.clone()));
        inputs
    }

    fn output(&self) -> ArtifactName {
        ArtifactName::Clusters
    }

    /// Must be a clusters file against the task and a job of `num_classes`.
    fn check_output(&self, payload: &[u8], num_classes: usize) -> Result<Checked, String> {
        let clusters = Clusters::from_json(payload, &ArtifactName::Clusters.to_string())
            .map_err(|e| e.to_string())?;
        if clusters.num_classes != num_classes || clusters.clusters.len() != self.specialists {
            return Err(format!(
                "{} clusters over {} classes, the job has {} specialists and {} classes",
                clusters.clusters.len(),
                clusters.num_classes,
                self.specialists,
                num_classes
            ));
        }
        Ok(Checked::Clusters(clusters))
    }

    fn run(&self, run: Run<'_>) -> Result<TaskOutput> {
        let Run(inputs, device, observer) = run;
        let train = inputs.data.train;
        let classes = train.num_classes();
        let started = Instant::now();
        let generalist = load_model(inputs, &self.generalist, device)?;
        let mut logits = Vec::with_capacity(train.len() * classes);
        for shard in 0..train.shard_ranges().len() {
            logits.extend(generalist.logits(&*train.shard(shard)?)?);
        }
        let probs = soft_targets(&[&logits], classes, 1.0, EnsembleCombine::Arithmetic)?;
        tick(observer, 1, started, train.len())?;
        if self.specialists < 2 || self.specialists > classes {
            return Err(Error::invalid(
                "specialists",
                format!(
                    "{} specialists for {classes} classes; need 2 to {classes}",
                    self.specialists
                ),
            ));
        }
        let clusters = Clusters {
            num_classes: classes,
            clusters: confusable_clusters(
                &probs,
                classes,
                self.specialists,
                self.classes_per_specialist,
                &mut seed::rng(self.seed, Stream::Clustering),
            ),
        };
        clusters.validate()?;
        tracing::info!(clusters = ?clusters.clusters, "classes clustered for the specialists");
        let summary = ClusterSummary {
            seconds: started.elapsed().as_secs_f64(),
            clusters: clusters.clusters.clone(),
        };
        let payload = serde_json::to_vec_pretty(&clusters).expect("clusters serialise");
        Ok(TaskOutput::new(payload, &summary))
    }
}
