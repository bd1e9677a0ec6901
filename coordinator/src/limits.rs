//! Bounds on what a request may carry, checked before anything else looks
//! at it: a malformed or hostile request gets INVALID_ARGUMENT and changes
//! nothing. (Payload contents — models, shards, clusters, checkpoints — are
//! validated by [`crate::job::Job`] against the plan.)

use proto::pb;
use tonic::Status;

/// Largest gRPC message the coordinator decodes: one 1 MiB chunk and its
/// framing, with room to spare. Anything larger is refused by tonic.
pub const MAX_MESSAGE_BYTES: usize = 2 * proto::CHUNK_BYTES;
/// Longest worker id, task id or artifact name.
pub const MAX_ID_BYTES: usize = 256;
/// Longest host name (DNS's limit).
pub const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest device or version string.
pub const MAX_LABEL_BYTES: usize = 64;
/// Most compute threads a worker may claim.
pub const MAX_THREADS: u32 = 4096;
/// Longest failure message kept (longer ones are cut).
pub const MAX_ERROR_BYTES: usize = 16 * 1024;
/// Largest task summary (JSON) accepted with a result.
pub const MAX_SUMMARY_BYTES: usize = 1 << 20;
/// Most epochs a progress report may mention.
pub const MAX_EPOCHS: u32 = 1_000_000;

fn invalid(what: String) -> Status {
    Status::invalid_argument(what)
}

/// Checks an id-like field: present, bounded, printable ASCII without
/// spaces (ids and artifact names are made by the coordinator).
pub fn id(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_ID_BYTES {
        return Err(invalid(format!(
            "{field} must be 1 to {MAX_ID_BYTES} bytes, got {}",
            value.len()
        )));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "{field} must be printable ASCII without spaces"
        )));
    }
    Ok(())
}

/// Checks what a registering worker says about itself.
pub fn capabilities(c: &pb::Capabilities) -> Result<(), Status> {
    if c.hostname.is_empty() || c.hostname.len() > MAX_HOSTNAME_BYTES {
        return Err(invalid(format!(
            "capabilities.hostname must be 1 to {MAX_HOSTNAME_BYTES} bytes, got {}",
            c.hostname.len()
        )));
    }
    if !c
        .hostname
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(invalid(
            "capabilities.hostname may hold only letters, digits, '-', '.' and '_'".into(),
        ));
    }
    for (field, value) in [("device", &c.device), ("version", &c.version)] {
        if value.len() > MAX_LABEL_BYTES {
            return Err(invalid(format!(
                "capabilities.{field} is longer than {MAX_LABEL_BYTES} bytes"
            )));
        }
    }
    let gpu = |d: &str| {
        d.strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<u32>().is_ok())
    };
    if c.device != "cpu" && !gpu(&c.device) {
        return Err(invalid(format!(
            "capabilities.device must be \"cpu\" or \"cuda:N\", got {:?}",
            c.device
        )));
    }
    if !(1..=MAX_THREADS).contains(&c.threads) {
        return Err(invalid(format!(
            "capabilities.threads must be in 1..={MAX_THREADS}, got {}",
            c.threads
        )));
    }
    Ok(())
}

/// Checks an upload's header: ids, size within `max_bytes`, a sha256 in
/// lowercase hex, finite non-negative seconds, a bounded summary.
pub fn upload_header(h: &pb::UploadHeader, max_bytes: u64) -> Result<(), Status> {
    id("worker_id", &h.worker_id)?;
    id("task_id", &h.task_id)?;
    if h.size > max_bytes {
        return Err(invalid(format!(
            "an upload of {} bytes exceeds the {max_bytes}-byte limit (max_artifact_mib)",
            h.size
        )));
    }
    if h.sha256.len() != 64
        || !h
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid("sha256 must be 64 lowercase hex digits".into()));
    }
    if !(h.seconds.is_finite() && (0.0..1e9).contains(&h.seconds)) {
        return Err(invalid(format!(
            "seconds must be a finite number in [0, 1e9), got {}",
            h.seconds
        )));
    }
    if h.summary_json.len() > MAX_SUMMARY_BYTES {
        return Err(invalid(format!(
            "the summary is over {MAX_SUMMARY_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Checks a heartbeat's ids and progress (epochs bounded, numbers finite).
pub fn heartbeat(req: &pb::HeartbeatRequest) -> Result<(), Status> {
    id("worker_id", &req.worker_id)?;
    id("task_id", &req.task_id)?;
    if let Some(p) = &req.progress {
        if p.epoch > MAX_EPOCHS || p.epochs > MAX_EPOCHS || (p.epochs > 0 && p.epoch > p.epochs) {
            return Err(invalid(format!(
                "progress.epoch {} of {} is out of bounds",
                p.epoch, p.epochs
            )));
        }
        if p.phase.len() > MAX_LABEL_BYTES {
            return Err(invalid(format!(
                "progress.phase is longer than {MAX_LABEL_BYTES} bytes"
            )));
        }
        if !p.examples_per_second.is_finite() || p.examples_per_second < 0.0 {
            return Err(invalid(
                "progress.examples_per_second must be finite and >= 0".into(),
            ));
        }
        // A NaN loss is news (a diverging run), not an attack: it is kept.
    }
    Ok(())
}

/// Checks a failure report's ids and cuts its message to a bounded length.
pub fn failure(report: &mut pb::FailureReport) -> Result<(), Status> {
    id("worker_id", &report.worker_id)?;
    id("task_id", &report.task_id)?;
    truncate_error(&mut report.error);
    Ok(())
}

/// Cuts a worker's error message to [`MAX_ERROR_BYTES`].
pub fn truncate_error(error: &mut String) {
    if error.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
        error.push_str(" […]");
    }
}

/// Checks a worker's report of an object it wrote to the bucket: the same
/// bounds as an upload's header, and a key.
pub fn stored_object(o: &pb::StoredObject, max_bytes: u64) -> Result<(), Status> {
    id("key", &o.key)?;
    upload_header(
        &pb::UploadHeader {
            worker_id: o.worker_id.clone(),
            task_id: o.task_id.clone(),
            attempt: o.attempt,
            sha256: o.sha256.clone(),
            size: o.size,
            seconds: o.seconds,
            summary_json: o.summary_json.clone(),
        },
        max_bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> pb::Capabilities {
        pb::Capabilities {
            device: "cuda:1".into(),
            threads: 8,
            memory_bytes: 0,
            hostname: "node-3.cluster".into(),
            version: "0.1.0".into(),
        }
    }

    fn header() -> pb::UploadHeader {
        pb::UploadHeader {
            worker_id: "w1-node".into(),
            task_id: "teacher-0".into(),
            attempt: 1,
            sha256: "a".repeat(64),
            size: 10,
            seconds: 1.0,
            summary_json: Vec::new(),
        }
    }

    #[test]
    fn good_requests_pass_and_each_bad_field_is_named() {
        capabilities(&caps()).unwrap();
        upload_header(&header(), 100).unwrap();
        type Spoil<T> = (fn(&mut T), &'static str);
        let bad_caps: [Spoil<pb::Capabilities>; 5] = [
            (|c| c.hostname = "x".repeat(300), "hostname"),
            (|c| c.hostname = "a b".into(), "hostname"),
            (|c| c.device = "tpu".into(), "device"),
            (|c| c.threads = 0, "threads"),
            (|c| c.version = "v".repeat(100), "version"),
        ];
        for (spoil, field) in bad_caps {
            let mut c = caps();
            spoil(&mut c);
            let e = capabilities(&c).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(field), "{}", e.message());
        }
        let bad_headers: [Spoil<pb::UploadHeader>; 6] = [
            (|h| h.size = 101, "limit"),
            (|h| h.sha256 = "XYZ".into(), "sha256"),
            (|h| h.seconds = f64::NAN, "seconds"),
            (|h| h.task_id = "../../etc/passwd x".into(), "task_id"),
            (|h| h.worker_id = String::new(), "worker_id"),
            (
                |h| h.summary_json = vec![b' '; MAX_SUMMARY_BYTES + 1],
                "summary",
            ),
        ];
        for (spoil, field) in bad_headers {
            let mut h = header();
            spoil(&mut h);
            let e = upload_header(&h, 100).unwrap_err();
            assert!(e.message().contains(field), "{}", e.message());
        }
    }

    #[test]
    fn progress_is_bounded_and_long_errors_are_cut() {
        let mut hb = pb::HeartbeatRequest {
            worker_id: "w".into(),
            task_id: "t".into(),
            attempt: 1,
            progress: Some(pb::Progress {
                epoch: 3,
                epochs: 10,
                loss: f64::NAN,
                ..Default::default()
            }),
        };
        heartbeat(&hb).unwrap();
        hb.progress.as_mut().unwrap().epoch = 11;
        assert!(heartbeat(&hb).is_err());
        hb.progress.as_mut().unwrap().epoch = 2;
        hb.progress.as_mut().unwrap().examples_per_second = f64::INFINITY;
        assert!(heartbeat(&hb).is_err());
        let mut report = pb::FailureReport {
            worker_id: "w".into(),
            task_id: "t".into(),
            error: "é".repeat(MAX_ERROR_BYTES),
            ..Default::default()
        };
        failure(&mut report).unwrap();
        assert!(report.error.len() <= MAX_ERROR_BYTES + 8);
        assert!(report.error.ends_with("[…]"));
    }
}
