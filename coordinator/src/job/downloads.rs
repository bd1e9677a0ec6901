//! Downloads: a stored artifact streamed to a worker and verified on the
//! way, so that an object that changed since it was stored ends the stream
//! with an error and is made again.

use bytes::Bytes;
use common::artifact::{ArtifactName, ArtifactRef};
use futures_util::stream::{self, BoxStream, StreamExt};
use sha2::{Digest, Sha256};

use super::shared::SharedJob;
use super::JobError;

/// An artifact's bytes in chunks; a lost or changed object ends it with
/// [`JobError::Regenerating`].
pub type Download = BoxStream<'static, Result<Bytes, JobError>>;

impl SharedJob {
    /// The stored artifact `name` for `worker`: its reference and its bytes.
    pub async fn download(
        &self,
        worker: &str,
        name: &ArtifactName,
    ) -> Result<(ArtifactRef, Download), JobError> {
        let stored = self.with_now(|job, now| job.stored_for(worker, name, now))?;
        let key = stored.stored_key();
        let problem = match self.store().size(&key).await {
            Ok(Some(size)) if size == stored.size => None,
            Ok(Some(size)) => Some(format!("{size} bytes long, {} were stored", stored.size)),
            Ok(None) => Some("missing".to_string()),
            Err(e) => Some(format!("unreadable ({e})")),
        };
        if let Some(problem) = problem {
            return Err(self.lost(name, &problem).await);
        }
        let data = match self.store().get(&key).await {
            Ok(data) => data,
            Err(e) => return Err(self.lost(name, &format!("unreadable ({e})")).await),
        };
        let verify = Verify {
            shared: self.clone(),
            stored: stored.clone(),
            hasher: Some(Sha256::new()),
            data,
        };
        let chunks = stream::unfold(verify, |mut v| async move {
            let hasher = v.hasher.as_mut()?;
            match v.data.next().await {
                Some(Ok(chunk)) => {
                    hasher.update(&chunk);
                    Some((Ok(chunk), v))
                }
                Some(Err(e)) => {
                    v.hasher = None;
                    let problem = format!("unreadable ({e})");
                    let lost = v.shared.lost(&v.stored.name, &problem).await;
                    Some((Err(lost), v))
                }
                None => {
                    let found = hex::encode(v.hasher.take().expect("checked").finalize());
                    if found == v.stored.sha256 {
                        return None;
                    }
                    let problem =
                        format!("corrupt (sha256 {found}, {} was stored)", v.stored.sha256);
                    let lost = v.shared.lost(&v.stored.name, &problem).await;
                    Some((Err(lost), v))
                }
            }
        });
        Ok((stored, chunks.boxed()))
    }
}

/// A download in progress; `hasher` is `None` once it ended.
struct Verify {
    shared: SharedJob,
    stored: ArtifactRef,
    hasher: Option<Sha256>,
    data: common::blob::ByteStream,
}
