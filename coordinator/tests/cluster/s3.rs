//! Artifacts in a real S3 server (the SeaweedFS that `scripts/test.sh`
//! starts; skipped, saying so, without one, required under CI): a job runs
//! end to end with its artifacts in the bucket, written and read by the
//! workers, and only its state in the output folder; wrong credentials stop
//! the coordinator at start-up before anything is written; a worker killed
//! mid-upload, the server killed and restarted mid-job and an object
//! corrupted after its commit leave the outputs byte-identical (against a
//! SeaweedFS of the test's own, which it can kill).

use common::blob::{self, s3::test_settings, BlobStore, S3Settings, S3Store};
use common::transfer::{Manifest, Shard};

use super::*;

/// Appends a `[storage]` table for `s3` to the config at `config`.
fn add_storage(config: &Path, s3: &S3Settings) {
    let text = std::fs::read_to_string(config).unwrap();
    let storage = format!(
        "\n[storage]\nkind = \"s3\"\nbucket = {:?}\nprefix = {:?}\nendpoint = {:?}\nregion = {:?}\nallow_http = true\n",
        s3.bucket,
        s3.prefix,
        s3.endpoint.as_deref().unwrap(),
        s3.region
    );
    std::fs::write(config, text + &storage).unwrap();
}

/// The store of the job whose output folder is `out` (named `out` by
/// `write_config`): the configured prefix and the folder's name.
fn job_store(s3: &S3Settings) -> S3Store {
    store_under(s3, "out")
}

/// The store of `folder` under the configured prefix.
fn store_under(s3: &S3Settings, folder: &str) -> S3Store {
    S3Store::new(&S3Settings {
        prefix: format!("{}/{folder}", s3.prefix),
        ..s3.clone()
    })
    .unwrap()
}

#[test]
fn a_job_with_s3_storage_keeps_its_artifacts_in_the_bucket() {
    let Some(s3) = test_settings("cluster-job") else {
        return;
    };
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2);
    add_storage(&config, &s3);
    let coordinator = Coordinator::start_with(&config, &["--listen", "127.0.0.1:0"]);
    let mut workers = Workers::start(2, &coordinator.url, dir.path());
    let (ok, stdout) = coordinator.wait(Duration::from_secs(240));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert!(stdout.contains("report: s3://"), "{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);

    let out = dir.path().join("out");
    let kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept, ["state"], "the output folder holds only the state");

    let store = job_store(&s3);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let keys = store.list("").await.unwrap();
        for key in [
            "dataset/index.json",
            "dataset/train/shard-00000.safetensors",
            "report.json",
            "report.md",
            "transfer/manifest.json",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        // Workers wrote every task's output under its attempt's key; the
        // coordinator wrote none of them.
        for artifact in [
            "evaluation.json",
            "models/student.safetensors",
            "models/teacher-0.safetensors",
        ] {
            let prefix = format!("attempts/{artifact}/");
            let written = keys.iter().filter(|k| k.starts_with(&prefix)).count();
            assert_eq!(written, 1, "one committed {artifact} in {keys:?}");
            assert!(
                !keys.iter().any(|k| k == artifact),
                "{artifact} in {keys:?}"
            );
        }
        assert!(
            !keys.iter().any(|k| k.starts_with("attempts/checkpoints/")),
            "checkpoints are deleted at the end: {keys:?}"
        );
        assert!(!keys.iter().any(|k| k == "probe"), "the probe is gone");
        // The transfer set reads back from the bucket alone, from the
        // manifest's fixed key, every shard checked against its sha256.
        let manifest = blob::get_bytes(&store, "transfer/manifest.json")
            .await
            .unwrap();
        let manifest: Manifest = serde_json::from_slice(&manifest).unwrap();
        let mut rows = 0;
        for entry in &manifest.shards {
            // The worker's attempt that was committed.
            let key = entry.key.clone().unwrap();
            assert!(key.starts_with("attempts/transfer/shard-"), "{key}");
            let bytes = blob::get_verified(&store, &key, &entry.sha256)
                .await
                .unwrap();
            let shard = Shard::decode(
                &bytes,
                Path::new(&key),
                manifest.encoding,
                entry.start..entry.end,
                &manifest.teachers,
                manifest.num_classes,
            )
            .unwrap();
            rows += shard.rows();
        }
        assert_eq!(rows, manifest.num_examples);
        let report: serde_json::Value =
            serde_json::from_slice(&blob::get_bytes(&store, "report.json").await.unwrap()).unwrap();
        assert!(report["models"].as_array().unwrap().len() >= 3, "{report}");
        // The report names each model's committed object.
        let file = report["models"][0]["file"].as_str().unwrap();
        assert!(
            file.starts_with("attempts/models/teacher-0.safetensors/"),
            "{file}"
        );
        assert!(keys.iter().any(|k| k == file), "{file} in {keys:?}");
    });
}

#[test]
fn wrong_s3_credentials_stop_the_coordinator_at_start_up_and_nothing_is_written() {
    let Some(s3) = test_settings("cluster-credentials") else {
        return;
    };
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1);
    add_storage(&config, &s3);
    let out = Command::new(coordinator_bin())
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env(TOKEN_ENV, TOKEN)
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[storage]") && err.contains("start-up check") && err.contains("credentials"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-secret"),
        "the secret is never printed: {err}"
    );
    assert!(
        !dir.path().join("out").join("state").exists(),
        "no state was written"
    );
    let store = job_store(&s3);
    let keys = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(store.list(""))
        .unwrap();
    assert!(keys.is_empty(), "nothing in the bucket: {keys:?}");
}

/// A SeaweedFS server of the test's own (`weed mini`, the binary that
/// `scripts/s3-test-server.sh` installs and names in `DISTILL_TEST_WEED`),
/// on free loopback ports, that the test kills and starts again on the
/// same data. Its keys are the `AWS_*` variables of the test's
/// environment, as for the shared server.
struct SeaweedFs {
    weed: PathBuf,
    data: tempfile::TempDir,
    base: u16,
    child: Option<Child>,
}

const FAULTS_BUCKET: &str = "faults";

impl SeaweedFs {
    /// A server, started and answering; `None` (saying so) without the
    /// binary, which under CI is a failure.
    fn start(name: &str) -> Option<Self> {
        let Ok(weed) = std::env::var("DISTILL_TEST_WEED") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{name}: CI needs DISTILL_TEST_WEED (scripts/test.sh sets it)"
            );
            eprintln!(
                "{name}: skipped, no SeaweedFS binary (DISTILL_TEST_WEED; scripts/test.sh sets it)"
            );
            return None;
        };
        let mut server = SeaweedFs {
            weed: weed.into(),
            data: tempfile::tempdir().unwrap(),
            base: free_port_block(),
            child: None,
        };
        server.spawn();
        Some(server)
    }

    /// Bucket settings under a prefix of their own.
    fn settings(&self, name: &str) -> S3Settings {
        S3Settings {
            bucket: FAULTS_BUCKET.into(),
            prefix: format!("faults/{name}"),
            endpoint: Some(format!("http://127.0.0.1:{}", self.base + 3)),
            region: "us-east-1".into(),
            allow_http: true,
        }
    }

    /// Starts `weed mini` on the data folder and waits until it answers.
    fn spawn(&mut self) {
        let port = |offset: u16| (self.base + offset).to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("weed.log"))
            .unwrap();
        let child = Command::new(&self.weed)
            .arg("mini")
            .arg(format!("-dir={}", self.data.path().join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ])
            .arg(format!("-bucket={FAULTS_BUCKET}"))
            .arg(format!("-master.port={}", port(0)))
            .arg(format!("-volume.port={}", port(1)))
            .arg(format!("-filer.port={}", port(2)))
            .arg(format!("-s3.port={}", port(3)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let store = S3Store::new(&self.settings("ready")).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let started = Instant::now();
        // The client retries with backoff while the server comes up.
        while let Err(e) = runtime.block_on(store.probe("probe")) {
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "SeaweedFS did not come up: {e}; its log: {}",
                std::fs::read_to_string(self.data.path().join("weed.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILLs the server.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A base port whose next five and their gRPC ports (+10000) are free.
fn free_port_block() -> u16 {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let mut seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    seed ^= std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for _ in 0..200 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let base = 20000 + ((seed >> 33) % 3000) as u16 * 10;
        if (base..base + 5).all(|p| free(p) && free(p + 10000)) {
            return base;
        }
    }
    panic!("no free ports for SeaweedFS");
}

/// The test job with teachers large enough (about 8.5 MB each, 17 MB
/// checkpoints) that their objects go up in parts, a checkpoint after every
/// epoch, its artifacts under `s3`.
fn write_large_s3_config(dir: &Path, s3: &S3Settings) -> PathBuf {
    let config = write_config(dir, 4);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("hidden = [64]", "hidden = [1500, 1400]")
        .replace(
            "max_attempts = 3",
            "max_attempts = 5\ncheckpoint_interval_secs = 0.0",
        );
    std::fs::write(&config, text).unwrap();
    add_storage(&config, s3);
    config
}

/// What a finished S3 job left in its bucket: every committed object by
/// its artifact's key (`attempts/<key>/<attempt>` read as `<key>`; exactly
/// one each, since uncommitted attempts are deleted), and the manifest
/// without its keys, which name attempts.
fn committed_objects(store: &S3Store) -> std::collections::BTreeMap<String, Vec<u8>> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut objects = std::collections::BTreeMap::new();
        for key in store.list("attempts/").await.unwrap() {
            let artifact = key
                .strip_prefix("attempts/")
                .and_then(|k| k.rsplit_once('/'))
                .map(|(artifact, _)| artifact.to_string())
                .unwrap();
            let bytes = blob::get_bytes(store, &key).await.unwrap();
            let earlier = objects.insert(artifact.clone(), bytes);
            assert!(earlier.is_none(), "two objects of {artifact} are left");
        }
        let manifest = blob::get_bytes(store, "transfer/manifest.json")
            .await
            .unwrap();
        let mut manifest: Manifest = serde_json::from_slice(&manifest).unwrap();
        for entry in &mut manifest.shards {
            let key = entry
                .key
                .take()
                .expect("the manifest names each shard's object");
            assert!(key.starts_with("attempts/transfer/"), "{key}");
        }
        objects.insert(
            "transfer/manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        );
        objects
    })
}

/// Runs the large S3 job in `dir` against `server`; with `strike`, SIGKILLs
/// a worker as it starts a multipart upload (a replacement joins), then
/// SIGKILLs the server for a few seconds and starts it again on the same
/// data. Returns what the job committed.
fn run_large_s3_job(
    server: &mut SeaweedFs,
    dir: &Path,
    name: &str,
    strike: bool,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let s3 = server.settings(name);
    let config = write_large_s3_config(dir, &s3);
    let coordinator =
        Coordinator::start_with(&config, &["--listen", "127.0.0.1:0", "--linger", "300"]);
    let mut workers = Workers::start_registered(2, &coordinator, dir);
    let mut victim = None;
    if strike {
        let (i, line) = loop {
            let (i, line) = workers
                .lines
                .recv_timeout(Duration::from_secs(180))
                .expect("no worker started a multipart upload");
            if line.contains("multipart upload started") {
                break (i, line);
            }
        };
        signal("-KILL", &[workers.pid(i)]);
        workers.children[i].wait().unwrap();
        eprintln!("killed worker {i} at: {line}");
        victim = Some(i);
        server.kill();
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            coordinator.api_status()["state"],
            "running",
            "the server went down mid-job"
        );
        server.spawn();
        // Once the server answers again: on a loaded machine its restart
        // can outlast a joining worker's two minutes of retries.
        workers.add_registered(&coordinator, dir);
    }
    coordinator.wait_for_status(Duration::from_secs(600), |s| s["state"] != "running");
    let (status, ok, stdout, _) = coordinator.finish_lingering(Duration::from_secs(60));
    assert!(
        ok && status["state"] == "succeeded",
        "the job failed:\n{stdout}"
    );
    for (i, child) in workers.children.iter_mut().enumerate() {
        if Some(i) != victim {
            assert!(child.wait().unwrap().success(), "worker {i} failed");
        }
    }
    let kept: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept, ["state"], "the output folder holds only the state");
    committed_objects(&job_store(&s3))
}

/// With S3, a worker SIGKILLed as it writes an object in parts and the S3
/// server SIGKILLed mid-job and started again on its data change nothing:
/// the job completes, each artifact is committed once, and every model and
/// shard is byte-identical to a run without faults. Then an object
/// corrupted in the bucket after its commit is found when the job is
/// started again, and made again, the same.
#[test]
fn with_s3_a_killed_worker_and_a_restarted_server_leave_the_outputs_byte_identical() {
    let Some(mut server) = SeaweedFs::start("cluster-s3-faults") else {
        return;
    };
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = run_large_s3_job(&mut server, reference_dir.path(), "reference", false);
    for model in ["teacher-0", "teacher-1", "student", "baseline"] {
        assert!(reference.contains_key(&format!("models/{model}.safetensors")));
    }
    assert!(
        reference["models/teacher-0.safetensors"].len() > common::blob::s3::PART_BYTES,
        "the teachers' objects are written in parts"
    );
    let dir = tempfile::tempdir().unwrap();
    let faulted = run_large_s3_job(&mut server, dir.path(), "faulted", true);
    assert_eq!(
        faulted.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    // Evaluation results hold timings; the models and the transfer set
    // must not change.
    let outputs = |objects: &std::collections::BTreeMap<String, Vec<u8>>| {
        objects
            .iter()
            .filter(|(k, _)| k.starts_with("models/") || k.starts_with("transfer/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        outputs(&reference).len(),
        4 + 4 + 1,
        "models, shards, manifest"
    );
    for (key, bytes) in outputs(&faulted) {
        assert!(bytes == reference[&key], "{key} differs after the faults");
    }

    // Corrupt a committed shard in the bucket; the restarted job finds it.
    let s3 = server.settings("faulted");
    let store = job_store(&s3);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let shard_key = runtime.block_on(async {
        let keys = store.list("attempts/transfer/").await.unwrap();
        let key = keys.into_iter().next().unwrap();
        let mut bytes = blob::get_bytes(&store, &key).await.unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        blob::put_bytes(&store, &key, bytes, blob::PutMode::Overwrite)
            .await
            .unwrap();
        key
    });
    let config = dir.path().join("cluster.toml");
    let coordinator = Coordinator::start_with(
        &config,
        &[
            "--listen",
            "127.0.0.1:0",
            "--local-workers",
            "2",
            "--local-worker-threads",
            "1",
        ],
    );
    let (ok, stdout, logs) = coordinator.wait_with_logs(Duration::from_secs(300));
    assert!(ok, "{stdout}");
    assert!(
        logs.iter()
            .any(|l| l.contains("a committed result is lost")),
        "the corruption of {shard_key} is found"
    );
    let again = committed_objects(&store);
    assert!(
        !runtime
            .block_on(store.list("attempts/transfer/"))
            .unwrap()
            .contains(&shard_key),
        "the corrupt object is gone"
    );
    for (key, bytes) in outputs(&again) {
        assert!(bytes == reference[&key], "{key} differs after regeneration");
    }
}

/// With S3 the task cache is a key prefix in the bucket: a second job of
/// the same tasks takes every result from it, copied on the server into its
/// own attempts, and its outputs are the first job's.
#[test]
fn with_s3_a_second_job_takes_every_result_from_the_task_cache_in_the_bucket() {
    let Some(s3) = test_settings("cluster-cache") else {
        return;
    };
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("cache_dir = \"cache\"\n{text}")).unwrap();
    add_storage(&config, &s3);
    let run = || {
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--local-workers",
            "1",
            "--local-worker-threads",
            "1",
        ];
        let (ok, stdout, logs) =
            Coordinator::start_with(&config, &args).wait_with_logs(Duration::from_secs(240));
        assert!(ok, "{stdout}");
        logs.iter()
            .filter(|l| l.contains("result taken from the task cache"))
            .count()
    };
    assert_eq!(run(), 0, "the first job runs every task");
    let first = committed_objects(&job_store(&s3));
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("output_dir = \"out\"", "output_dir = \"second\""),
    )
    .unwrap();
    let taken = run();
    let second_store = store_under(&s3, "second");
    let second = committed_objects(&second_store);
    assert_eq!(
        taken,
        first.len() - 1,
        "every task's result (all but the manifest)"
    );
    assert_eq!(second, first, "the same outputs");
    let cache = store_under(&s3, "cache");
    let entries = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(cache.list(""))
        .unwrap();
    assert_eq!(
        entries.len(),
        2 * taken,
        "result.bin and meta.json: {entries:?}"
    );
}
