//! The cluster token and TLS (plain and mutual).

use super::*;

/// Without the token (or with a wrong one) the coordinator answers
/// UNAUTHENTICATED; the health service answers anyway; a worker with the
/// wrong token gives up at once instead of retrying.
#[test]
fn unauthenticated_calls_are_refused_but_health_answers() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1);
    let coordinator = Coordinator::start(&config);
    let url = coordinator.url.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use proto::pb::coordinator_client::CoordinatorClient;
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let register = || proto::pb::RegisterRequest {
            capabilities: Some(Default::default()),
        };
        let err = CoordinatorClient::new(channel.clone())
            .register(register())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let wrong = proto::auth::Token::new("not-the-cluster-token", "test").unwrap();
        let err = CoordinatorClient::with_interceptor(
            channel.clone(),
            proto::auth::AttachToken::new(Some(&wrong)),
        )
        .register(register())
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let health = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            health.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    });
    let started = Instant::now();
    let out = Command::new(worker_bin())
        .args(["--coordinator", &url, "--cpu", "--give-up-after", "60"])
        .arg("--scratch")
        .arg(dir.path().join("intruder"))
        .env(TOKEN_ENV, "not-the-cluster-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the cluster token"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "no retrying");
    assert!(!err.contains(TOKEN) && !err.contains("not-the-cluster-token"));
    // The real workers still finish the job.
    let mut workers = Workers::start(2, &url, dir.path());
    let (ok, stdout) = coordinator.wait(Duration::from_secs(240));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
}

#[test]
fn without_a_token_the_coordinator_refuses_to_start() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1);
    let out = Command::new(coordinator_bin())
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove(TOKEN_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no cluster token") && err.contains(TOKEN_ENV),
        "{err}"
    );
    // Saying so in the config switches authentication off.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("authentication = \"off\"\n{text}")).unwrap();
    let mut open = Command::new(coordinator_bin())
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove(TOKEN_ENV)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(open.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("coordinator listening on "), "{line}");
    open.kill().unwrap();
    open.wait().unwrap();
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, both
/// signed by it, written as `ca.pem`, `server.{pem,key}`, `client.{pem,key}`.
/// Returns the CA's path.
fn write_test_pki(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    for (name, sans) in [
        ("server", vec!["localhost".to_string(), "127.0.0.1".into()]),
        ("client", vec!["worker".into()]),
    ] {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    let path = dir.join("ca.pem");
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

/// The small job's config with `[tls]` (plus `extra` keys in that table).
fn tls_config(dir: &Path, extra: &str) -> PathBuf {
    let config = write_config(dir, 10);
    let text = std::fs::read_to_string(&config).unwrap();
    let tls = format!("[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n{extra}\n[dataset]");
    std::fs::write(&config, text.replacen("[dataset]", &tls, 1)).unwrap();
    config
}

/// With mutual TLS, a worker without a client certificate signed by the
/// CA cannot join; workers with one run the job.
#[test]
fn with_mutual_tls_only_workers_with_a_client_certificate_join() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_test_pki(dir.path());
    let config = tls_config(dir.path(), "client_ca = \"ca.pem\"\n");
    let coordinator = Coordinator::start(&config);
    let out = Command::new(worker_bin())
        .args([
            "--coordinator",
            &coordinator.url,
            "--cpu",
            "--give-up-after",
            "2",
        ])
        .arg("--tls-ca")
        .arg(&ca_path)
        .arg("--scratch")
        .arg(dir.path().join("no-cert"))
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a worker without a client certificate joined"
    );
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client.key");
    let mut workers = Workers::start_with(
        2,
        &coordinator.url,
        dir.path(),
        &[
            "--tls-ca".as_ref(),
            ca_path.as_os_str(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ],
    );
    let (ok, stdout) = coordinator.wait(Duration::from_secs(240));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
}

/// With `[tls]` the coordinator serves only TLS: a plaintext client cannot
/// talk to it, and workers that trust its CA run the job to completion.
#[test]
fn with_tls_plaintext_is_refused_and_workers_trusting_the_ca_finish() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_test_pki(dir.path());
    let config = tls_config(dir.path(), "");
    let coordinator = Coordinator::start(&config);
    assert!(
        coordinator.url.starts_with("https://"),
        "{}",
        coordinator.url
    );
    let plain_url = coordinator.url.replacen("https://", "http://", 1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let result = async {
            let channel = tonic::transport::Endpoint::from_shared(plain_url.clone())?
                .connect()
                .await?;
            proto::pb::coordinator_client::CoordinatorClient::new(channel)
                .register(proto::pb::RegisterRequest::default())
                .await?;
            Ok::<_, Box<dyn std::error::Error>>(())
        }
        .await;
        assert!(result.is_err(), "a plaintext client got through");
    });
    // A worker without the CA is told what is missing.
    let out = Command::new(worker_bin())
        .args(["--coordinator", &coordinator.url, "--cpu"])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"));
    let mut workers = Workers::start_with(
        2,
        &coordinator.url,
        dir.path(),
        &["--tls-ca".as_ref(), ca_path.as_os_str()],
    );
    let (ok, stdout) = coordinator.wait(Duration::from_secs(240));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
    check_outputs(&dir.path().join("out"));
}
