//! Whole jobs through real processes: the two-worker job, a bad config,
//! the generalist + specialists job.

use super::*;

#[test]
fn coordinator_and_two_workers_run_a_job_to_completion() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let coordinator =
        Coordinator::start_with(&config, &["--listen", "127.0.0.1:0", "--linger", "120"]);
    // The first worker is held (SIGSTOP) from its first lease until the
    // second has one too, so that both run tasks however fast each starts.
    // Its lease may expire meanwhile: the task then moves on.
    let mut workers = Workers::start(0, &coordinator.url, dir.path());
    for i in 0..2 {
        workers.add_registered(&coordinator, dir.path());
        let id = workers.ids[i].clone();
        coordinator.wait_for_status(Duration::from_secs(60), |s| tasks_leased(s, &id) >= 1);
        if i == 0 {
            signal("-STOP", &[workers.pid(0)]);
        }
    }
    signal("-CONT", &[workers.pid(0)]);
    assert_eq!(
        workers.wait_all(Duration::from_secs(240)),
        vec![true, true],
        "workers exit 0 when told the job is over"
    );
    let (status, ok, stdout, _) = coordinator.finish_lingering(Duration::from_secs(30));
    assert!(
        ok && status["state"] == "succeeded",
        "coordinator failed:\n{stdout}"
    );
    assert!(stdout.contains("report: "), "{stdout}");
    for id in &workers.ids {
        assert!(tasks_leased(&status, id) >= 1, "{id} ran tasks: {status}");
    }
    let made_by: std::collections::BTreeSet<&str> = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["worker"].as_str().expect("a done task names its worker"))
        .collect();
    eprintln!("results made by {made_by:?}");
    check_outputs(&dir.path().join("out"));
}

#[test]
fn a_bad_config_fails_at_once_naming_the_key() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("transfer_shards = 4", "transfer_shards = 0");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(coordinator_bin())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("transfer_shards") && err.contains("cluster.toml"),
        "{err}"
    );
}

/// A generalist + specialists job: 12 classes in 4 planted groups of 3, one
/// specialist per group, both students, through two worker processes.
#[test]
fn a_generalist_and_specialists_job_runs_to_completion() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("num_classes = 6", "num_classes = 12")
        .replace("count = 2", "count = 1")
        + "\n[specialists]\ncount = 4\n[specialists.train]\nepochs = 3\nbatch_size = 32\n";
    std::fs::write(&config, text).unwrap();
    let coordinator =
        Coordinator::start_with(&config, &["--listen", "127.0.0.1:0", "--linger", "120"]);
    let mut workers = Workers::start(2, &coordinator.url, dir.path());
    let (status, ok, stdout, _) = coordinator.finish_lingering(Duration::from_secs(300));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert!(stdout.contains("## Specialists"), "{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
    let specialists_ran = tasks_where(&status, |t| {
        t["id"].as_str().unwrap().starts_with("specialist-") && t["attempts"] != 0
    });
    assert_eq!(specialists_ran.len(), 4, "{status}");

    let out = dir.path().join("out");
    let report = read_report(&out);
    let models = report["models"].as_array().unwrap();
    let role_of = |name: &str| {
        models
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in the report"))["role"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(role_of("teacher-0"), "teacher");
    assert_eq!(role_of("combined"), "combined");
    assert_eq!(role_of("student-combined"), "student");
    for m in 0..4 {
        let name = format!("specialist-{m:02}");
        assert_eq!(role_of(&name), "specialist");
        assert!(out.join(format!("models/{name}.safetensors")).is_file());
    }
    let sp = &report["specialists"];
    let clusters: Vec<Vec<usize>> = serde_json::from_value(sp["clusters"].clone()).unwrap();
    let mut covered: Vec<usize> = clusters.iter().flatten().copied().collect();
    covered.sort();
    assert_eq!(covered, (0..12).collect::<Vec<_>>(), "a partition");
    // Table 4: with a partition every class is covered once.
    let groups = sp["by_coverage"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["specialists_covering"], 1);
    assert_eq!(groups[0]["test_examples"], 600);
    assert_eq!(sp["comparison"].as_array().unwrap().len(), 4);
    // The combination is a real classifier on 12 classes (chance: 1/12).
    assert!(sp["combined_test_accuracy"].as_f64().unwrap() > 0.5, "{sp}");

    // The transfer set holds the generalist's logits and ln q.
    let set = TransferSet::open(&out.join("transfer")).unwrap();
    assert_eq!(set.manifest().teachers, ["teacher-0", "combined"]);
    for shard in set.shards() {
        let shard = shard.unwrap();
        for row in shard.logits(1).chunks(12) {
            let total: f64 = row.iter().map(|&z| f64::from(z).exp()).sum();
            assert!((total - 1.0).abs() < 1e-4, "ln q sums to 1: {total}");
        }
    }
}
