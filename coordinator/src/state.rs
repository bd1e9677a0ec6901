//! The job's durable state: an embedded transactional database (redb) in
//! `<output_dir>/state/job.redb` that survives a crash of the coordinator.
//!
//! It holds what a restarted coordinator needs to resume the job without
//! redoing committed work:
//! - the job's *identity*: the config's result-affecting settings, as dotted
//!   keys, and the dataset bundle's checksum. A restart with a different
//!   config is refused with the keys that changed ([`StateDb::check_config`]);
//! - one *commit* per finished task ([`CommittedTask`]): its artifact
//!   (name, checksum and size; the blob store knows where it is) and what
//!   the report needs. The artifact is stored *before* its commit, so a
//!   committed task's artifact exists unless something outside the
//!   coordinator removed it;
//! - the latest training *checkpoint* of each unfinished task;
//! - the *attempt floor*: fencing ids are reserved in blocks, so a restarted
//!   coordinator never hands out an attempt id that a worker of the previous
//!   run may still quote.
//!
//! Every write is one transaction committed durably (redb's default).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::artifact::ArtifactRef;
use common::transfer::ShardEntry;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// The database's file under the state folder.
pub const STATE_FILE: &str = "job.redb";

/// Changes when the meaning of the stored records changes.
/// (2: records hold typed artifact references instead of file paths.)
const STATE_FORMAT: &str = "distill-job-state/2";

/// Keys of the `meta` table.
const FORMAT_KEY: &str = "format";
const CONFIG_KEY: &str = "config";
const DATASET_KEY: &str = "dataset_sha256";
const ATTEMPT_FLOOR_KEY: &str = "attempt_floor";

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const COMMITS: TableDefinition<&str, &[u8]> = TableDefinition::new("commits");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");

/// Memory redb may use to cache the state's pages.
const STATE_CACHE_BYTES: usize = 16 << 20;

/// Fencing ids reserved per database write.
pub const ATTEMPT_BLOCK: u64 = 1024;

/// A problem with the state database.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database could not be opened, read or written.
    #[error("job state {path}: {message}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        message: String,
    },
    /// The stored state belongs to another job (or another format).
    #[error("{0}")]
    Mismatch(String),
}

/// A finished task as the database keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommittedTask {
    /// The artifact the task made.
    pub artifact: ArtifactRef,
    /// Seconds the compute took.
    pub seconds: f64,
    /// The worker's summary JSON.
    pub summary: serde_json::Value,
    /// Whether the result came from the task cache.
    pub cached: bool,
    /// The manifest entry, for a transfer-set shard.
    pub shard: Option<ShardEntry>,
}

/// The latest training checkpoint of an unfinished task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCheckpoint {
    /// The checkpoint.
    pub artifact: ArtifactRef,
    /// Epochs the checkpoint is after.
    pub epochs_done: usize,
}

/// The state database of one job.
pub struct StateDb {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish()
    }
}

impl StateDb {
    /// Opens (or creates) the database in folder `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(STATE_FILE);
        std::fs::create_dir_all(dir).map_err(|e| StateError::Db {
            path: path.clone(),
            message: format!("cannot create {}: {e}", dir.display()),
        })?;
        // The state is small (a record per task); redb's default cache
        // (1 GiB) would only grow the coordinator's memory.
        let db = redb::Database::builder()
            .set_cache_size(STATE_CACHE_BYTES)
            .create(&path)
            .map_err(|e| StateError::Db {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let state = StateDb { db, path };
        let format = state.meta(FORMAT_KEY)?;
        match format.as_deref() {
            None => state.write(|tx| {
                tx.open_table(META)?.insert(FORMAT_KEY, STATE_FORMAT)?;
                Ok(())
            })?,
            Some(STATE_FORMAT) => {}
            Some(other) => {
                return Err(StateError::Mismatch(format!(
                    "{} was written by another version ({other}, this is {STATE_FORMAT}); \
                     start over with --fresh",
                    state.path.display()
                )))
            }
        }
        Ok(state)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the database holds a job (its identity was recorded).
    pub fn has_job(&self) -> Result<bool, StateError> {
        Ok(self.meta(CONFIG_KEY)?.is_some())
    }

    /// Records the job's settings (`config`, dotted keys) on its first
    /// start; on a restart, checks that they are the same. The error names
    /// every key that changed.
    pub fn check_config(&self, config: &BTreeMap<String, String>) -> Result<(), StateError> {
        let Some(stored) = self.meta(CONFIG_KEY)? else {
            let json = serde_json::to_string(config).expect("string maps serialise");
            return self.write(|tx| {
                tx.open_table(META)?.insert(CONFIG_KEY, json.as_str())?;
                Ok(())
            });
        };
        let stored: BTreeMap<String, String> =
            serde_json::from_str(&stored).map_err(|e| self.corrupt(e))?;
        let changed = changed_keys(&stored, config);
        if !changed.is_empty() {
            return Err(StateError::Mismatch(format!(
                "the config changed since this job started: {}. Restore it to resume the job, \
                 or start over with --fresh",
                changed.join(", ")
            )));
        }
        Ok(())
    }

    /// Records the dataset bundle's checksum on the job's first start; on a
    /// restart, checks that the data is the same.
    pub fn check_dataset(&self, sha256: &str) -> Result<(), StateError> {
        match self.meta(DATASET_KEY)? {
            None => self.write(|tx| {
                tx.open_table(META)?.insert(DATASET_KEY, sha256)?;
                Ok(())
            }),
            Some(stored) if stored == sha256 => Ok(()),
            Some(_) => Err(StateError::Mismatch(
                "the dataset changed since this job started (its files differ); restore them \
                 to resume the job, or start over with --fresh"
                    .into(),
            )),
        }
    }

    /// Records that task `id` finished with `commit`, in one transaction.
    pub fn commit_task(&self, id: &str, commit: &CommittedTask) -> Result<(), StateError> {
        let json = serde_json::to_vec(commit).expect("commits serialise");
        self.write(|tx| {
            tx.open_table(COMMITS)?.insert(id, json.as_slice())?;
            Ok(())
        })
    }

    /// Forgets task `id`'s commit (its artifact is lost and it runs again).
    pub fn forget_task(&self, id: &str) -> Result<(), StateError> {
        self.write(|tx| {
            tx.open_table(COMMITS)?.remove(id)?;
            Ok(())
        })
    }

    /// Records `checkpoint` as task `id`'s latest.
    pub fn save_checkpoint(
        &self,
        id: &str,
        checkpoint: &StoredCheckpoint,
    ) -> Result<(), StateError> {
        let json = serde_json::to_vec(checkpoint).expect("checkpoints serialise");
        self.write(|tx| {
            tx.open_table(CHECKPOINTS)?.insert(id, json.as_slice())?;
            Ok(())
        })
    }

    /// Forgets task `id`'s checkpoint (the task finished, or it is lost).
    pub fn forget_checkpoint(&self, id: &str) -> Result<(), StateError> {
        self.write(|tx| {
            tx.open_table(CHECKPOINTS)?.remove(id)?;
            Ok(())
        })
    }

    /// Every task's latest checkpoint by task id.
    pub fn checkpoints(&self) -> Result<BTreeMap<String, StoredCheckpoint>, StateError> {
        self.read_all(CHECKPOINTS)
    }

    /// Every committed task by id.
    pub fn committed(&self) -> Result<BTreeMap<String, CommittedTask>, StateError> {
        self.read_all(COMMITS)
    }

    fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<BTreeMap<String, T>, StateError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = match tx.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.db_err(e)),
        };
        let mut out = BTreeMap::new();
        for row in table.iter().map_err(|e| self.db_err(e))? {
            let (id, value) = row.map_err(|e| self.db_err(e))?;
            let record: T = serde_json::from_slice(value.value()).map_err(|e| self.corrupt(e))?;
            out.insert(id.value().to_string(), record);
        }
        Ok(out)
    }

    /// The first fencing id this run may hand out: above every id a previous
    /// run could have used.
    pub fn attempt_floor(&self) -> Result<u64, StateError> {
        match self.meta(ATTEMPT_FLOOR_KEY)? {
            None => Ok(1),
            Some(v) => v.parse().map_err(|e| self.corrupt(e)),
        }
    }

    /// Records that ids below `floor` may have been handed out (a lower
    /// floor than the stored one changes nothing).
    pub fn raise_attempt_floor(&self, floor: u64) -> Result<(), StateError> {
        if self.attempt_floor()? >= floor {
            return Ok(());
        }
        let value = floor.to_string();
        self.write(|tx| {
            tx.open_table(META)?
                .insert(ATTEMPT_FLOOR_KEY, value.as_str())?;
            Ok(())
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StateError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.db_err(e)),
        };
        Ok(table
            .get(key)
            .map_err(|e| self.db_err(e))?
            .map(|v| v.value().to_string()))
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        f(&tx).map_err(|e| self.db_err(e))?;
        tx.commit().map_err(|e| self.db_err(e))
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            message: e.into().to_string(),
        }
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            message: format!("a stored record is unreadable ({e}); start over with --fresh"),
        }
    }
}

/// The keys whose values differ between `before` and `after` (added,
/// removed or changed), each as `key (old → new)`.
pub fn changed_keys(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (old, new) = (before.get(k), after.get(k));
            (old != new).then(|| {
                let show = |v: Option<&String>| v.map_or("unset".to_string(), |v| v.clone());
                format!("{k} ({} → {})", show(old), show(new))
            })
        })
        .collect()
}

/// Flattens a JSON value into dotted keys and JSON-encoded leaves (arrays
/// are leaves; null values are left out, like absent keys).
pub fn flatten(value: &serde_json::Value) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::Null => {}
            leaf => {
                out.insert(prefix.to_string(), leaf.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::artifact::ArtifactName;

    fn commit(sha: &str) -> CommittedTask {
        CommittedTask {
            artifact: ArtifactRef {
                name: ArtifactName::Model("teacher-0".into()),
                sha256: sha.into(),
                size: 7,
                key: None,
            },
            seconds: 1.5,
            summary: serde_json::json!({"epochs": 2}),
            cached: false,
            shard: None,
        }
    }

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn commits_and_the_attempt_floor_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = StateDb::open(dir.path()).unwrap();
            assert!(!db.has_job().unwrap());
            assert!(db.committed().unwrap().is_empty());
            assert_eq!(db.attempt_floor().unwrap(), 1);
            db.check_config(&keys(&[("seed", "1")])).unwrap();
            db.check_dataset("abc").unwrap();
            db.commit_task("teacher-0", &commit("aa")).unwrap();
            db.commit_task("baseline", &commit("bb")).unwrap();
            db.forget_task("baseline").unwrap();
            db.raise_attempt_floor(2049).unwrap();
            let checkpoint = StoredCheckpoint {
                artifact: ArtifactRef {
                    name: ArtifactName::Checkpoint("student".into()),
                    sha256: "cc".into(),
                    size: 9,
                    key: None,
                },
                epochs_done: 4,
            };
            db.save_checkpoint("student", &checkpoint).unwrap();
            db.save_checkpoint("baseline", &checkpoint).unwrap();
            db.forget_checkpoint("baseline").unwrap();
        }
        let db = StateDb::open(dir.path()).unwrap();
        assert!(db.has_job().unwrap());
        let committed = db.committed().unwrap();
        assert_eq!(committed.len(), 1);
        assert_eq!(committed["teacher-0"], commit("aa"));
        assert_eq!(db.attempt_floor().unwrap(), 2049);
        db.raise_attempt_floor(1025).unwrap();
        assert_eq!(db.attempt_floor().unwrap(), 2049, "a floor never goes down");
        let checkpoints = db.checkpoints().unwrap();
        assert_eq!(checkpoints.len(), 1);
        assert_eq!(checkpoints["student"].epochs_done, 4);
    }

    #[test]
    fn a_restart_with_another_config_or_dataset_is_refused_naming_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let first = keys(&[("seed", "1"), ("teachers.hidden", "[8]"), ("a", "x")]);
        db.check_config(&first).unwrap();
        db.check_dataset("abc").unwrap();
        db.check_config(&first).unwrap();
        db.check_dataset("abc").unwrap();
        let changed = keys(&[("seed", "2"), ("teachers.hidden", "[8]"), ("b", "y")]);
        let err = db.check_config(&changed).unwrap_err().to_string();
        assert!(err.contains("seed (1 → 2)"), "{err}");
        assert!(err.contains("a (x → unset)"), "{err}");
        assert!(err.contains("b (unset → y)"), "{err}");
        assert!(!err.contains("teachers.hidden"), "{err}");
        assert!(err.contains("--fresh"), "{err}");
        let err = db.check_dataset("other").unwrap_err().to_string();
        assert!(err.contains("dataset changed"), "{err}");
    }

    #[test]
    fn flatten_gives_dotted_keys_and_drops_nulls() {
        let v = serde_json::json!({"a": {"b": 1, "c": [1, 2], "d": null}, "e": "s"});
        assert_eq!(
            flatten(&v),
            keys(&[("a.b", "1"), ("a.c", "[1,2]"), ("e", "\"s\"")])
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"not a database at all").unwrap();
        let err = StateDb::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("job.redb"), "{err}");
    }
}
