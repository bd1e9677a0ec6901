//! Malformed and hostile gRPC requests, and reflection.

use super::*;

/// Sends a battery of malformed and hostile requests to a running
/// coordinator; returns each one's name and the status code it got.
async fn send_bad_requests(url: &str, out: &Path) -> Vec<(&'static str, tonic::Code)> {
    use proto::pb;
    let token = proto::auth::Token::new(TOKEN, "test").unwrap();
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::coordinator_client::CoordinatorClient::with_interceptor(
        channel,
        proto::auth::AttachToken::new(Some(&token)),
    );
    let mut got = Vec::new();
    fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
        r.map_or_else(|s| s.code(), |_| tonic::Code::Ok)
    }
    let caps = pb::Capabilities {
        device: "cpu".into(),
        threads: 1,
        memory_bytes: 0,
        hostname: "prober".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let register = |caps: Option<pb::Capabilities>| pb::RegisterRequest { capabilities: caps };
    got.push((
        "register without capabilities",
        code(client.register(register(None)).await),
    ));
    let mut long_host = caps.clone();
    long_host.hostname = "h".repeat(1000);
    got.push((
        "register with a 1000-byte host name",
        code(client.register(register(Some(long_host))).await),
    ));
    let mut no_threads = caps.clone();
    no_threads.threads = 0;
    got.push((
        "register with 0 threads",
        code(client.register(register(Some(no_threads))).await),
    ));
    let mut old = caps.clone();
    old.version = "0.0.0".into();
    got.push((
        "register with another version",
        code(client.register(register(Some(old))).await),
    ));
    let worker = client
        .register(register(Some(caps)))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let lease = |w: &str| pb::LeaseRequest {
        worker_id: w.into(),
    };
    got.push((
        "lease as an unknown worker",
        code(client.lease_task(lease("w999-nobody")).await),
    ));
    got.push((
        "lease with a 10 kB worker id",
        code(client.lease_task(lease(&"w".repeat(10_000))).await),
    ));
    let task = match client
        .lease_task(lease(&worker))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(pb::lease_response::Outcome::Task(t)) => t,
        other => panic!("expected a task, got {other:?}"),
    };
    let heartbeat = |task_id: &str, epoch: u32| pb::HeartbeatRequest {
        worker_id: worker.clone(),
        task_id: task_id.into(),
        attempt: task.attempt,
        progress: Some(pb::Progress {
            epoch,
            epochs: 5,
            ..Default::default()
        }),
    };
    got.push((
        "heartbeat for an unknown task",
        code(client.heartbeat(heartbeat("nope", 1)).await),
    ));
    got.push((
        "heartbeat with epoch 9 of 5",
        code(client.heartbeat(heartbeat(&task.task_id, 9)).await),
    ));
    let header = |attempt: u64, payload: &[u8], size: u64| pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Header(pb::UploadHeader {
            worker_id: worker.clone(),
            task_id: task.task_id.clone(),
            attempt,
            sha256: common::checksum::sha256_hex(payload),
            size,
            seconds: 1.0,
            summary_json: Vec::new(),
        })),
    };
    let data = |bytes: &[u8]| pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Data(bytes.to_vec())),
    };
    let garbage = b"not a model at all".to_vec();
    let n = garbage.len() as u64;
    let uploads: Vec<(&'static str, Vec<pb::UploadChunk>)> = vec![
        ("upload without a header", vec![data(&garbage)]),
        (
            "upload for a stale attempt",
            vec![header(task.attempt + 1000, &garbage, n), data(&garbage)],
        ),
        (
            "upload over the size limit",
            vec![header(task.attempt, &garbage, 1 << 50)],
        ),
        (
            "upload with a wrong checksum",
            vec![header(task.attempt, b"other", n), data(&garbage)],
        ),
        (
            "upload of fewer bytes than announced",
            vec![header(task.attempt, &garbage, n + 5), data(&garbage)],
        ),
        (
            "upload of a garbage model",
            vec![header(task.attempt, &garbage, n), data(&garbage)],
        ),
        (
            "upload of a 3 MiB message",
            vec![
                header(task.attempt, &garbage, 3 << 20),
                data(&vec![0u8; 3 << 20]),
            ],
        ),
    ];
    for (name, messages) in uploads {
        got.push((
            name,
            code(client.upload_result(tokio_stream::iter(messages)).await),
        ));
    }
    let checkpoint = vec![header(task.attempt, &garbage, n), data(&garbage)];
    got.push((
        "checkpoint of garbage",
        code(
            client
                .upload_checkpoint(tokio_stream::iter(checkpoint))
                .await,
        ),
    ));
    let download = |name: &str| pb::DownloadRequest {
        worker_id: worker.clone(),
        name: name.into(),
    };
    got.push((
        "download of ../../etc/passwd",
        code(client.download_artifact(download("../../etc/passwd")).await),
    ));
    let failure = |task_id: &str, released: bool| pb::FailureReport {
        worker_id: worker.clone(),
        task_id: task_id.into(),
        attempt: task.attempt,
        error: "x".repeat(100_000),
        permanent: false,
        released,
    };
    got.push((
        "failure of an unknown task",
        code(client.report_failure(failure("nope", false)).await),
    ));
    assert!(
        !out.join("models")
            .join(format!("{}.safetensors", task.task_id))
            .exists(),
        "nothing was stored"
    );
    // Give the task back so that the probe costs it no attempt.
    client
        .report_failure(failure(&task.task_id, true))
        .await
        .unwrap();
    got
}

/// Malformed and hostile requests are each refused with a fitting status
/// and store nothing; the coordinator stays up and the job then runs to
/// completion with real workers.
#[test]
fn bad_requests_are_refused_and_the_job_still_completes() {
    use tonic::Code;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let coordinator = Coordinator::start(&config);
    let out = dir.path().join("out");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = runtime.block_on(send_bad_requests(&coordinator.url, &out));
    let expected = [
        ("register without capabilities", Code::InvalidArgument),
        ("register with a 1000-byte host name", Code::InvalidArgument),
        ("register with 0 threads", Code::InvalidArgument),
        ("register with another version", Code::FailedPrecondition),
        ("lease as an unknown worker", Code::Aborted),
        ("lease with a 10 kB worker id", Code::InvalidArgument),
        ("heartbeat for an unknown task", Code::NotFound),
        ("heartbeat with epoch 9 of 5", Code::InvalidArgument),
        ("upload without a header", Code::InvalidArgument),
        ("upload for a stale attempt", Code::FailedPrecondition),
        ("upload over the size limit", Code::InvalidArgument),
        ("upload with a wrong checksum", Code::DataLoss),
        ("upload of fewer bytes than announced", Code::DataLoss),
        ("upload of a garbage model", Code::InvalidArgument),
        ("upload of a 3 MiB message", Code::OutOfRange),
        ("checkpoint of garbage", Code::InvalidArgument),
        ("download of ../../etc/passwd", Code::NotFound),
        ("failure of an unknown task", Code::NotFound),
    ];
    for ((name, code), (want_name, want)) in got.iter().zip(&expected) {
        assert_eq!(name, want_name);
        assert_eq!(code, want, "{name}");
    }
    assert_eq!(got.len(), expected.len());
    let mut workers = Workers::start(2, &coordinator.url, dir.path());
    let (ok, stdout, logs) = coordinator.wait_with_logs(Duration::from_secs(240));
    assert!(ok, "{stdout}");
    assert!(
        !logs.iter().any(|l| l.contains("task attempt failed")),
        "the probe cost no task an attempt"
    );
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
    check_outputs(&out);
}
