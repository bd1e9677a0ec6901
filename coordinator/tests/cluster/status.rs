//! What people see of a running job: the status page in a real browser,
//! the metrics endpoint and `coordinator status`.

use super::*;

/// The value of metric `name` (with its labels, as printed) in a
/// Prometheus text exposition; 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Headless Chromium, which the README's test command installs; its absence
/// is a failure, never a skip.
fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
        .expect("Chromium is not installed: run the README's test command (`bash scripts/test.sh`), which installs Debian's `chromium`")
}

/// Runs headless Chromium on `url` with `what` (`--dump-dom` or
/// `--screenshot=FILE`); returns its stdout.
fn browse(url: &str, what: &str) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--window-size=1280,900",
            // Lets the page's script fetch and render the job's status.
            "--virtual-time-budget=4000",
            what,
            url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// During a running job: the status page, loaded in headless Chromium,
/// shows the tasks and the workers (a screenshot is kept); it needs the
/// token off loopback; the metrics endpoint's task counters move; and
/// `coordinator status` prints the same summary in a terminal.
#[test]
fn the_status_page_metrics_and_status_command_show_the_running_job() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Long teachers, and a lease that outlasts the pause below.
    let config = write_config(dir.path(), 5000);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("lease_timeout_secs = 3.0", "lease_timeout_secs = 600.0");
    std::fs::write(&config, text).unwrap();
    // Off loopback, so that the page needs the token.
    let coordinator = Coordinator::start_with(
        &config,
        &[
            "--listen",
            "127.0.0.1:0",
            "--status-listen",
            "0.0.0.0:0",
            "--linger",
            "30",
        ],
    );
    // One worker also serves its metrics and the gRPC health service.
    let (worker_metrics, worker_health) = (free_loopback_address(), free_loopback_address());
    let mut workers = Workers::start_with(
        1,
        &coordinator.url,
        dir.path(),
        &[
            "--metrics-listen".as_ref(),
            worker_metrics.as_ref(),
            "--health-listen".as_ref(),
            worker_health.as_ref(),
        ],
    );
    let mut other = Workers::start(1, &coordinator.url, &dir.path().join("other"));
    // Both workers run a task (the teachers lease first); then both are
    // paused, so that nothing moves while the page is read, however fast
    // or slow this machine is.
    let running =
        coordinator.wait_for_status(Duration::from_secs(120), |s| s["counts"]["running"] == 2);
    let paused = [&workers, &other].map(|w| w.children[0].id().to_string());
    signal("-STOP", &paused);
    let frozen = coordinator.api_status();
    assert_eq!(frozen["counts"]["running"], 2, "{running}");
    let (code, _) = coordinator.http_get("/api/status");
    assert_eq!(code, 401, "no token, no status");
    let (code, before) = coordinator.http_get(&format!("/metrics?token={TOKEN}"));
    assert_eq!(code, 200);
    assert!(
        metric(&before, "distill_tasks{state=\"running\"}") >= 1.0,
        "{before}"
    );
    assert_eq!(
        metric(&before, "distill_tasks{state=\"done\"}"),
        frozen["counts"]["done"].as_f64().unwrap(),
        "{before}"
    );
    assert!(metric(&before, "distill_workers_alive") >= 1.0, "{before}");

    let page = format!(
        "{}?token={TOKEN}",
        coordinator.status_url.replace("0.0.0.0", "127.0.0.1")
    );
    let dom = browse(&page, "--dump-dom");
    for task in [
        "teacher-0",
        "teacher-1",
        "baseline",
        "infer-00000",
        "student",
        "evaluate",
    ] {
        assert!(
            dom.contains(&format!("data-task=\"{task}\"")),
            "{task} is not on the page:\n{dom}"
        );
    }
    assert!(
        dom.contains("data-worker=\"w1-") && dom.contains("data-worker=\"w2-"),
        "{dom}"
    );
    assert!(
        dom.contains("class=\"task running\""),
        "a running task is shown as running"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    browse(&page, &format!("--screenshot={}", shot.display()));
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real screenshot"
    );
    eprintln!("status page screenshot: {}", shot.display());

    let addr = coordinator.url.trim_start_matches("http://");
    let status = Command::new(coordinator_bin())
        .args(["status", "--addr", addr])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        printed.contains("tasks done") && printed.contains("running teacher-"),
        "{printed}"
    );
    assert!(printed.contains("workers: 2 alive of 2"), "{printed}");
    // The workers' own servers answer only while they run.
    signal("-CONT", &paused);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let services = runtime.block_on(reflected_services(&coordinator.url));
    for service in ["distill.cluster.v1.Coordinator", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == service), "{services:?}");
    }
    let health = runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{worker_health}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    });
    assert_eq!(
        health,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Its epoch gauge is set at the end of its first epoch.
    loop {
        let (_, line) = workers
            .lines
            .recv_timeout(Duration::from_secs(120))
            .expect("a teacher trains");
        if line.contains("epoch done") {
            break;
        }
    }
    let worker_text = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&worker_metrics).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: {worker_metrics}\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    assert!(
        worker_text.contains("distill_worker_epoch"),
        "{worker_text}"
    );

    coordinator.wait_for_status(Duration::from_secs(120), |s| {
        s["counts"]["done"].as_u64() >= Some(1)
    });
    let (_, after) = coordinator.http_get(&format!("/metrics?token={TOKEN}"));
    assert!(
        metric(&after, "distill_tasks{state=\"done\"}") >= 1.0,
        "{after}"
    );
    assert!(
        metric(&after, "distill_tasks_completed_total") >= 1.0,
        "{after}"
    );

    // After the job, --linger keeps the page and the report up.
    coordinator.wait_for_status(Duration::from_secs(240), |s| s["report"].is_string());
    let (code, report) = coordinator.http_get(&format!("/report.md?token={TOKEN}"));
    assert_eq!(code, 200);
    assert!(report.contains("student"), "{report}");
    let (_, done) = coordinator.http_get(&format!("/api/status?token={TOKEN}"));
    let done: serde_json::Value = serde_json::from_str(&done).unwrap();
    assert_eq!(done["state"], "succeeded");
    assert!(done["report"].as_str().unwrap().contains("student"));
    let pid = coordinator.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (ok, stdout) = coordinator.wait(Duration::from_secs(30));
    assert!(
        ok,
        "SIGTERM while lingering ends a finished job well: {stdout}"
    );
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true]);
    assert_eq!(other.wait_all(Duration::from_secs(20)), vec![true]);
}

/// The services a gRPC server lists through reflection (as grpcurl asks).
async fn reflected_services(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    match answers
        .message()
        .await
        .unwrap()
        .and_then(|a| a.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    }
}
