//! `coordinator status --addr HOST:PORT`: asks a running coordinator for
//! its [`JobStatus`] over gRPC, with the cluster token (and TLS settings)
//! a worker would use.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use proto::auth::{AttachToken, Token};
use proto::pb;

use crate::status::JobStatus;

/// The status of the job the coordinator at `addr` runs.
pub async fn fetch(
    addr: &str,
    token_file: Option<&Path>,
    tls_ca: Option<&Path>,
) -> anyhow::Result<JobStatus> {
    let token = Token::from_file_or_env(token_file).map_err(anyhow::Error::msg)?;
    let scheme = if tls_ca.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}");
    let mut endpoint = tonic::transport::Channel::from_shared(url.clone())
        .with_context(|| format!("--addr {addr:?} is not HOST:PORT"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if let Some(ca) = tls_ca {
        let pem =
            std::fs::read(ca).with_context(|| format!("--tls-ca: cannot read {}", ca.display()))?;
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    let mut client = pb::coordinator_client::CoordinatorClient::with_interceptor(
        channel,
        AttachToken::new(token.as_ref()),
    );
    let response = client
        .get_status(pb::StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    serde_json::from_slice(&response.status_json)
        .context("the coordinator sent a status this version cannot read")
}
