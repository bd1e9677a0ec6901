//! The coordinator of a distillation job: it reads `cluster.toml`, loads and
//! splits the dataset, plans the job as a task graph, serves the tasks to
//! workers over gRPC ([`service`]), stores their results (the coordinator is
//! the single writer of the output folder), and writes the report.
//!
//! [`run`] is the whole program; `main.rs` only parses arguments.

pub mod cache;
pub mod config;
pub mod data;
pub mod http;
pub mod job;
pub mod limits;
pub mod local_workers;
pub mod plan;
pub mod report;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod status;
pub mod status_client;
pub mod storage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::Context;
use common::artifact::ArtifactName;
use common::blob::BlobStore;
use proto::auth::{RequireToken, Token, TOKEN_ENV};
use proto::pb::coordinator_server::CoordinatorServer;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::config::{ClusterConfig, StorageConfig};
use crate::job::SharedJob;
use crate::job::{DatasetFacts, Job, LeasePolicy};
use crate::local_workers::LocalWorkers;
use crate::report::{SplitSizes, TransferSummary};
use crate::service::{CoordinatorService, Settings};
use crate::state::StateDb;

/// How the coordinator was started.
#[derive(Clone, Debug)]
pub struct Options {
    /// The job's `cluster.toml`.
    pub config: PathBuf,
    /// Listen address overriding the config's `listen`.
    pub listen: Option<String>,
    /// Worker processes to start on this machine.
    pub local_workers: usize,
    /// Compute threads of each local worker.
    pub local_worker_threads: usize,
    /// GPUs for the local workers, shared round-robin (none: on the CPU).
    pub local_worker_gpus: Vec<usize>,
    /// Log format, passed on to local workers.
    pub log_format: common::logging::LogFormat,
    /// File holding the cluster token (else `DISTILL_CLUSTER_TOKEN`).
    pub token_file: Option<PathBuf>,
    /// Forget an earlier run's state and outputs and start the job over.
    pub fresh: bool,
    /// Status page address overriding the config's `status_listen`.
    pub status_listen: Option<String>,
    /// After the job ends, keep serving the status page and the report
    /// this long.
    pub linger: Duration,
}

/// What to do after the coordinator stopped early.
const RESUME_HINT: &str = "every finished task and the latest checkpoints are saved: start the \
    coordinator again with the same config to resume";

/// The state folder under the output folder.
pub const STATE_DIR: &str = "state";

/// How a job ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Where `report.json` is (a path, or a URL in a bucket).
    pub report: String,
    /// The report.
    pub summary: String,
}

/// Runs the job of `opts.config` to the end: `Ok` with the report when every
/// task is done, an error saying why otherwise.
pub async fn run(opts: Options) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let cfg = ClusterConfig::load(&opts.config)?;
    let token = cluster_token(&cfg, &opts)?;
    let listen = opts.listen.clone().unwrap_or_else(|| cfg.listen.clone());
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?} is not an address like 127.0.0.1:50051"))?;
    let out = cfg.output_dir.clone();
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output_dir {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("cannot resolve output_dir {}", out.display()))?;
    let store = storage::open(&cfg.storage, &out).await?;
    if opts.fresh {
        remove_run_outputs(&out, &cfg.storage, &*store).await?;
    }
    let state = StateDb::open(&out.join(STATE_DIR))?;
    let resuming = state.has_job()?;
    state.check_config(&cfg.identity())?;

    if !resuming {
        // Shards of a run without state (an older version) must not mix
        // with this run's.
        for key in store.list("transfer/").await? {
            store.remove(&key).await?;
        }
    }
    let dataset = crate::data::prepare(&cfg, &*store).await?;
    let index = &dataset.index;
    tracing::info!(
        dataset = cfg.dataset.source.name(),
        train = index.train.len,
        validation = index.validation.len,
        test = index.test.len,
        shards = dataset.artifacts.len() - 1,
        "dataset stored as shards"
    );
    cfg.check_classes(&opts.config, index.num_classes)?;
    state.check_dataset(&dataset.index_ref().sha256)?;
    if let Some(subset) = cfg.transfer_subset() {
        tracing::info!(
            fraction = subset.fraction,
            "the student and the baseline learn from a subset"
        );
    }
    let sizes = SplitSizes {
        train: index.train.len,
        validation: index.validation.len,
        test: index.test.len,
        dim: index.dim,
        classes: index.num_classes,
    };
    let plan = plan::plan(&cfg, &index.layout())?;
    let poll_ms = cfg.heartbeat_interval_ms.min(500) as u32;
    let job = Job::new(
        plan,
        DatasetFacts {
            fingerprint: index.train.fingerprint.clone(),
            train_len: sizes.train,
            num_classes: sizes.classes,
        },
        dataset.artifacts.clone(),
        LeasePolicy {
            timeout: Duration::from_secs_f64(cfg.lease_timeout_secs),
            max_attempts: cfg.max_attempts,
            poll_ms,
        },
        state.attempt_floor()?,
        coordinator_instance(),
    );
    let cache = cfg
        .cache_dir
        .as_ref()
        .map(|dir| storage::open_cache(&cfg.storage, dir, &*store));
    let tasks = job.scheduler.len();
    let shared = SharedJob::new(
        job,
        store,
        Arc::new(state),
        cache,
        started,
        cfg.dataset.source.name().into(),
    );
    if resuming {
        let resumed = shared.resume().await?;
        tracing::info!(
            done = resumed.restored.len(),
            regenerated = resumed.regenerated.len(),
            checkpoints = resumed.checkpoints.len(),
            of = tasks,
            "resuming the job from its state"
        );
    }
    shared.sweep_attempts().await?;
    let settings = Settings {
        heartbeat_ms: cfg.heartbeat_interval_ms as u32,
        checkpoint_ms: (cfg.checkpoint_interval_secs * 1000.0) as u32,
        max_artifact_bytes: cfg.max_artifact_mib << 20,
        storage: match &cfg.storage {
            StorageConfig::S3(s3) => Some(storage::job_settings(s3, &out)),
            StorageConfig::Local => None,
        },
    };

    let tls = server_tls(&cfg, &opts)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
    // Tests and scripts read this line to find the port when listening on :0.
    println!("coordinator listening on {url}");
    let (status_url, status_stop, status_server) =
        serve_status(&cfg, &opts, &shared, token.as_ref()).await?;
    println!("status page on {status_url}");
    tracing::info!(%url, tasks, output_dir = %out.display(), "job planned, serving");

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("[tls]")?;
    }
    // Reflection, so that grpcurl and similar tools find the services (the
    // calls themselves still need the token).
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection")?;
    let server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(InterceptedService::new(
                CoordinatorServer::new(CoordinatorService::new(shared.clone(), settings))
                    .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(limits::MAX_MESSAGE_BYTES),
                RequireToken::new(token.clone()),
            ))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );

    let mut local = if opts.local_workers > 0 {
        Some(LocalWorkers::spawn(
            opts.local_workers,
            opts.local_worker_threads,
            &opts.local_worker_gpus,
            opts.log_format,
            &url,
            token.as_ref(),
            cfg.tls.as_ref().and_then(|t| t.ca.as_deref()),
            &out.join("scratch"),
        )?)
    } else {
        None
    };

    // One listener for the whole run: a SIGTERM that arrives between the
    // job's end and the linger below is kept, not lost.
    let mut sigterm = terminate_signal()?;
    let mut stop_asked = false;
    let result = supervise(&shared, &cfg, &mut local, &mut sigterm, &mut stop_asked).await;
    let result = match result {
        Ok(()) if cfg.load_test.is_some() => Ok(load_test_outcome(&shared, &out, started)),
        Ok(()) => finish_report(&shared, &cfg, sizes, started).await,
        Err(e) => Err(e),
    };
    // Let connected workers learn that the job is over before going away.
    wait_for_workers_told(
        &shared,
        Duration::from_millis(3 * cfg.heartbeat_interval_ms + 2000),
    )
    .await;
    // A stop asked for during the job ends the coordinator without lingering.
    if !opts.linger.is_zero() && !stop_asked {
        tracing::info!(
            seconds = opts.linger.as_secs_f64(),
            url = %status_url,
            "the job is over; serving the status page and the report until --linger runs out"
        );
        tokio::select! {
            _ = tokio::time::sleep(opts.linger) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    }
    let _ = status_stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), status_server).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    // Only now: while the service runs, a listed object may be committed
    // between the listing and its deletion.
    if let Err(e) = shared.sweep_attempts().await {
        tracing::warn!(error = %e, "could not delete the objects of uncommitted attempts");
    }
    if let Some(local) = local {
        if result.is_err() {
            // Let them give their tasks back (with a checkpoint) and exit.
            local.terminate();
        }
        local.finish(Duration::from_secs(30)).await;
    }
    result
}

/// Starts the status page and metrics server; returns its URL, the sender
/// that stops it, and its task.
async fn serve_status(
    cfg: &ClusterConfig,
    opts: &Options,
    shared: &SharedJob,
    token: Option<&Token>,
) -> anyhow::Result<(
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)> {
    let listen = opts
        .status_listen
        .clone()
        .unwrap_or_else(|| cfg.status_listen.clone());
    let addr: SocketAddr = listen.parse().with_context(|| {
        format!("--status-listen {listen:?} is not an address like 127.0.0.1:8080")
    })?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("status_listen: cannot listen on {addr} (another job's status page? set status_listen or --status-listen, port 0 picks a free one)")
    })?;
    let addr = listener.local_addr()?;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed; /metrics shows only its own");
    }
    let server = http::StatusServer {
        shared: shared.clone(),
        metrics: handle,
        token: http::token_for(&addr, token),
    };
    if server.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the status page is open to anyone who reaches it (authentication is off)");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = axum::serve(listener, server.router()).with_graceful_shutdown(async {
        let _ = stop_rx.await;
    });
    let task = tokio::spawn(async move {
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "the status page server stopped");
        }
    });
    Ok((format!("http://{addr}/"), stop_tx, task))
}

/// A random number that tells this coordinator process's worker ids from
/// those of an earlier process of the same job (workers keep their id
/// across a coordinator restart until they are told to register again).
fn coordinator_instance() -> u32 {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the operating system's random generator works");
    u32::from_le_bytes(bytes)
}

/// Removes what an earlier run left (for `--fresh`): its objects in
/// `store` and its state in `out`.
async fn remove_run_outputs(
    out: &std::path::Path,
    storage: &config::StorageConfig,
    store: &dyn BlobStore,
) -> anyhow::Result<()> {
    let removed = storage::remove_earlier_run(storage, store).await?;
    if removed > 0 {
        tracing::info!(objects = removed, store = %store.describe(), "--fresh: removed the earlier run's objects");
    }
    let state = out.join(STATE_DIR);
    match std::fs::remove_dir_all(&state) {
        Ok(()) => tracing::info!(path = %state.display(), "--fresh: removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("--fresh: cannot remove {}", state.display()))
        }
    }
    Ok(())
}

/// The main loop: expires leases, logs a summary now and then, and returns
/// when the job is over (an error if it failed or was interrupted). A
/// SIGTERM or Ctrl-C sets `stop_asked`; it interrupts the job unless the job
/// is over by then.
async fn supervise(
    shared: &SharedJob,
    cfg: &ClusterConfig,
    local: &mut Option<LocalWorkers>,
    sigterm: &mut tokio::signal::unix::Signal,
    stop_asked: &mut bool,
) -> anyhow::Result<()> {
    let summary_every = Duration::from_secs_f64(cfg.summary_interval_secs);
    let mut last_summary = Instant::now();
    let bar = common::logging::progress_bars().map(|bars| {
        let total = shared.with(|job| job.scheduler.len());
        let bar = bars.add(indicatif::ProgressBar::new(total as u64));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} tasks  {wide_msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        let mut stopped_by = None;
        tokio::select! {
            _ = interval.tick() => {}
            _ = tokio::signal::ctrl_c() => stopped_by = Some("interrupted (Ctrl-C)"),
            _ = sigterm.recv() => stopped_by = Some("terminated (SIGTERM)"),
        }
        *stop_asked |= stopped_by.is_some();
        let (over, failure) = shared.with_now(|job, now| {
            job.tick(now);
            if let Some(bar) = &bar {
                bar.set_position(job.scheduler.counts().done as u64);
                bar.set_message(job.running_line());
            } else if last_summary.elapsed() >= summary_every {
                tracing::info!("{}", job.summary_line(now));
                last_summary = Instant::now();
            }
            (job.scheduler.is_over(), job.scheduler.failure())
        });
        if over || failure.is_some() {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
        }
        if let Some(f) = failure {
            anyhow::bail!("the job failed: {f}");
        }
        if over {
            return Ok(());
        }
        if let Some(how) = stopped_by {
            anyhow::bail!("{how} before the job finished; {RESUME_HINT}");
        }
        if let Some(l) = local.as_mut() {
            if l.running() == 0 {
                anyhow::bail!(
                    "all local workers exited before the job finished (see their log lines above)"
                );
            }
        }
    }
}

#[cfg(unix)]
fn terminate_signal() -> anyhow::Result<tokio::signal::unix::Signal> {
    Ok(tokio::signal::unix::signal(
        tokio::signal::unix::SignalKind::terminate(),
    )?)
}

async fn wait_for_workers_told(shared: &SharedJob, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        let pending = shared.with_now(|job, now| job.workers_not_told(now, grace));
        if pending == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The token every call must carry: from `--token-file` or the
/// environment; made up for a job whose only workers are local; `None` when
/// the config switches authentication off. Without one, refuses to start.
fn cluster_token(cfg: &ClusterConfig, opts: &Options) -> anyhow::Result<Option<Token>> {
    let given = Token::from_file_or_env(opts.token_file.as_deref()).map_err(anyhow::Error::msg)?;
    match (cfg.authentication, given) {
        (config::Authentication::Off, given) => {
            if given.is_some() {
                tracing::warn!(
                    "authentication = \"off\" in the config: the given token is not used"
                );
            }
            tracing::warn!("authentication is off: anyone who reaches the port can join the job");
            Ok(None)
        }
        (config::Authentication::Token, Some(token)) => Ok(Some(token)),
        (config::Authentication::Token, None) if opts.local_workers > 0 => {
            tracing::info!("no cluster token given: made one for the local workers");
            Ok(Some(Token::generate()))
        }
        (config::Authentication::Token, None) => anyhow::bail!(
            "no cluster token: give one with --token-file FILE or the {TOKEN_ENV} environment \
             variable (workers need the same), or set authentication = \"off\" in {}",
            opts.config.display()
        ),
    }
}

/// The server's TLS settings from `[tls]`, reading its files (errors name
/// the key and the file); `None` without `[tls]`.
fn server_tls(
    cfg: &ClusterConfig,
    opts: &Options,
) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let Some(tls) = &cfg.tls else {
        return Ok(None);
    };
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("tls.{key}: cannot read {}", path.display()))
    };
    let mut server = ServerTlsConfig::new().identity(Identity::from_pem(
        read("cert", &tls.cert)?,
        read("key", &tls.key)?,
    ));
    if let Some(ca) = &tls.client_ca {
        anyhow::ensure!(
            opts.local_workers == 0,
            "tls.client_ca (mutual TLS) is not supported with --local-workers: they have no client certificate"
        );
        server = server.client_ca_root(Certificate::from_pem(read("client_ca", ca)?));
    }
    anyhow::ensure!(
        opts.local_workers == 0 || tls.ca.is_some(),
        "--local-workers with [tls] needs tls.ca, the CA that signed tls.cert, for the workers to trust"
    );
    Ok(Some(server))
}

/// A load test has no report: its outcome is the count of tasks done.
fn load_test_outcome(shared: &SharedJob, out: &std::path::Path, started: Instant) -> Outcome {
    let done = shared.with(|job| job.scheduler.counts().done);
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(tasks = done, seconds, "load test done");
    Outcome {
        report: out
            .join(STATE_DIR)
            .join(state::STATE_FILE)
            .display()
            .to_string(),
        summary: format!("load test: {done} no-op tasks done in {seconds:.1} s"),
    }
}

async fn finish_report(
    shared: &SharedJob,
    cfg: &ClusterConfig,
    sizes: SplitSizes,
    started: Instant,
) -> anyhow::Result<Outcome> {
    let report = shared.with(|job| -> anyhow::Result<_> {
        let evaluations = job
            .evaluations
            .clone()
            .context("the evaluation task stored no results")?;
        let bytes = (0..job.plan.shards)
            .filter_map(|i| job.artifact_ref(&ArtifactName::Shard(i)))
            .map(|a| a.size)
            .sum();
        let transfer = TransferSummary {
            examples: sizes.train,
            teachers: job.plan.transfer_teachers.clone(),
            shards: job.plan.shards,
            bytes,
            dir: "transfer".into(),
        };
        Ok(report::build(
            cfg,
            sizes,
            &job.plan,
            report::Outcomes {
                evaluations: &evaluations,
                records: &job.records,
                clusters: job.clusters.as_ref(),
                model_keys: &job.model_keys(),
            },
            transfer,
            started.elapsed().as_secs_f64(),
        ))
    })?;
    let store = shared.store();
    report.write(&**store).await?;
    let location = store.location(report::REPORT_JSON);
    tracing::info!(report = %location, "job done");
    Ok(Outcome {
        report: location,
        summary: report.to_markdown(),
    })
}
