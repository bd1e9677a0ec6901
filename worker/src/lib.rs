//! A worker of a distillation job: it registers with the coordinator, then
//! leases tasks until the coordinator says the job is over. Everything it
//! needs (the dataset, teacher models, transfer shards) it downloads from
//! the coordinator, or with S3 reads from the job's bucket, and caches by
//! checksum ([`cache`]); compute runs on a thread of its own while the
//! async runtime heartbeats ([`runner`]).

pub mod cache;
pub mod client;
pub mod runner;
pub mod shutdown;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use distill::device::{select, DeviceChoice};
use proto::pb;
use tracing::Instrument;

use crate::cache::ArtifactCache;
use crate::client::with_backoff;
use crate::runner::{run_task, WorkerState};

/// How the worker was started.
#[derive(Clone, Debug)]
pub struct Options {
    /// The coordinator's URL, such as `http://10.0.0.5:50051`.
    pub coordinator: String,
    /// CPU or which GPU.
    pub device: DeviceChoice,
    /// Compute threads.
    pub threads: usize,
    /// Scratch folder for the artifact cache.
    pub scratch: PathBuf,
    /// Give up after this long without reaching the coordinator.
    pub give_up_after: Duration,
    /// The cluster token and TLS settings.
    pub credentials: client::Credentials,
    /// After SIGTERM, how long the running task may take to reach a
    /// checkpoint (or its end) before it is abandoned.
    pub stop_grace: Duration,
    /// Serve the standard gRPC health service here (for probes).
    pub health_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics (`/metrics`) here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Why the worker exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The job is over and succeeded.
    JobSucceeded,
    /// The job is over and failed.
    JobFailed,
    /// Stopped by SIGTERM or Ctrl-C before the job was over.
    Stopped,
}

/// Runs the worker until the job is over or a signal stops it.
pub async fn run(opts: Options) -> anyhow::Result<Exit> {
    client::check_url(&opts.coordinator, &opts.credentials)?;
    let shutdown = shutdown::Shutdown::default();
    shutdown.listen(opts.stop_grace)?;
    if let Some(addr) = opts.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("--metrics-listen {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    }
    if let Some(addr) = opts.health_listen {
        serve_health(addr).await?;
    }
    let device = select(opts.device)?;
    let cache = ArtifactCache::open(&opts.scratch)?;
    let caps = pb::Capabilities {
        device: match opts.device {
            DeviceChoice::Cpu => "cpu".into(),
            DeviceChoice::Gpu(n) => format!("cuda:{n}"),
        },
        threads: opts.threads as u32,
        memory_bytes: physical_memory(),
        hostname: hostname(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let (client, registered) = register(&opts, &caps).await?;
    tracing::info!(worker = %registered.worker_id, job = %registered.job, "registered");
    let store = open_bucket(&registered).await?;
    // Every later line (the compute thread's too) names this worker.
    let span = tracing::info_span!("worker", id = %registered.worker_id);
    let state = WorkerState {
        worker_id: registered.worker_id,
        heartbeat: Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(10))),
        checkpoint_interval: Duration::from_millis(u64::from(registered.checkpoint_interval_ms)),
        cache,
        store,
        scratch: opts.scratch.clone(),
        device,
        shutdown,
    };
    serve(&opts, &caps, client, state).instrument(span).await
}

/// Leases and runs tasks until the job is over.
async fn serve(
    opts: &Options,
    caps: &pb::Capabilities,
    mut client: client::Client,
    mut state: WorkerState,
) -> anyhow::Result<Exit> {
    loop {
        if state.shutdown.stopping() {
            tracing::warn!("stopped before the job was over");
            return Ok(Exit::Stopped);
        }
        let lease = client
            .lease_task(pb::LeaseRequest {
                worker_id: state.worker_id.clone(),
            })
            .await;
        let outcome = match lease {
            Ok(r) => r.into_inner().outcome,
            Err(s) if s.code() == tonic::Code::Aborted => {
                // The coordinator no longer knows us (it restarted): join again.
                let (c, r) = register(opts, caps).await?;
                client = c;
                state.store = open_bucket(&r).await?;
                state.worker_id = r.worker_id;
                continue;
            }
            Err(s) if is_transient(&s) => {
                tracing::warn!("coordinator unreachable: {}", s.message());
                client = with_backoff("reconnecting", opts.give_up_after, || {
                    client::connect(&opts.coordinator, &opts.credentials)
                })
                .await?;
                continue;
            }
            Err(s) => {
                return Err(anyhow::anyhow!(
                    "the coordinator refused to lease: {}",
                    s.message()
                ))
            }
        };
        match outcome {
            Some(pb::lease_response::Outcome::Task(assignment)) => {
                run_task(&mut client, &mut state, assignment).await?;
            }
            Some(pb::lease_response::Outcome::Wait(w)) => {
                tokio::time::sleep(Duration::from_millis(u64::from(w.retry_after_ms.max(10))))
                    .await;
            }
            Some(pb::lease_response::Outcome::JobOver(over)) => {
                tracing::info!(succeeded = over.succeeded, message = %over.message, "job over; exiting");
                return Ok(if over.succeeded {
                    Exit::JobSucceeded
                } else {
                    Exit::JobFailed
                });
            }
            None => anyhow::bail!("the coordinator sent an empty lease response"),
        }
    }
}

/// The job's bucket when the coordinator says workers read and write it
/// directly, with credentials from this worker's environment, checked
/// (write, read back, delete a probe object) so that a worker that cannot
/// reach it stops at once and says why.
async fn open_bucket(
    registered: &pb::RegisterResponse,
) -> anyhow::Result<Option<std::sync::Arc<common::blob::S3Store>>> {
    let Some(wire) = &registered.storage else {
        return Ok(None);
    };
    let settings = client::storage(wire);
    let store = common::blob::S3Store::new(&settings)
        .with_context(|| format!("the job's bucket {}", settings.describe()))?;
    let probe = format!("probes/{}", registered.worker_id);
    store.probe(&probe).await.with_context(|| {
        format!(
            "the job's artifacts are in {}, and this worker cannot use it (write, read back and delete {probe:?}); \
             give it the bucket's credentials in its AWS_* environment",
            settings.describe()
        )
    })?;
    tracing::info!(store = %settings.describe(), "reading and writing artifacts in the bucket");
    Ok(Some(std::sync::Arc::new(store)))
}

/// Serves the standard gRPC health service on `addr` (SERVING while the
/// process lives), for liveness and readiness probes.
async fn serve_health(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--health-listen: cannot listen on {addr}"))?;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(async move {
        // The reporter must live as long as the service reports.
        let _reporter = reporter;
        let serving = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "the health service stopped");
        }
    });
    tracing::info!(%addr, "serving gRPC health");
    Ok(())
}

/// Errors that mean "the coordinator is (for now) out of reach", as
/// opposed to a refusal.
pub(crate) fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

async fn register(
    opts: &Options,
    caps: &pb::Capabilities,
) -> anyhow::Result<(client::Client, pb::RegisterResponse)> {
    with_backoff("registering", opts.give_up_after, || async {
        let mut client = client::connect(&opts.coordinator, &opts.credentials).await?;
        let response = client
            .register(pb::RegisterRequest {
                capabilities: Some(caps.clone()),
            })
            .await
            .context("registration refused")?
            .into_inner();
        Ok((client, response))
    })
    .await
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        pages as u64 * page as u64
    } else {
        0
    }
}
