//! Artifacts in a real S3 server (the SeaweedFS that `scripts/test.sh`
//! starts; skipped, saying so, without one, required under CI): a job runs
//! end to end with its artifacts in the bucket and only its state in the
//! output folder; wrong credentials stop the coordinator at start-up before
//! anything is written.

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
    S3Store::new(&S3Settings {
        prefix: format!("{}/out", s3.prefix),
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
            "dataset.safetensors",
            "evaluation.json",
            "models/student.safetensors",
            "models/teacher-0.safetensors",
            "report.json",
            "report.md",
            "transfer/manifest.json",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "probe"), "the probe is gone");
        // The transfer set reads back from the bucket alone, from the
        // manifest's fixed key, every shard checked against its sha256.
        let manifest = blob::get_bytes(&store, "transfer/manifest.json")
            .await
            .unwrap();
        let manifest: Manifest = serde_json::from_slice(&manifest).unwrap();
        let mut rows = 0;
        for entry in &manifest.shards {
            let key = format!("transfer/{}", entry.file);
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
