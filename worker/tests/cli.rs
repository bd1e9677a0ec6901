//! The worker binary's command line: errors that must come at once and say
//! what to do.

use std::process::Command;
use std::time::{Duration, Instant};

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker"))
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_without_cuda_build_fails_at_once_saying_how_to_build() {
    let out = worker()
        .args(["--coordinator", "http://127.0.0.1:9", "--gpu", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features cuda"), "{err}");
}

#[test]
fn a_device_must_be_chosen() {
    let out = worker()
        .args(["--coordinator", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gpu") && err.contains("--cpu"), "{err}");
}

#[test]
fn gives_up_after_the_configured_time_without_a_coordinator() {
    // Port 9 (discard) on loopback: nothing listens, connections are refused.
    let scratch = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = worker()
        .args([
            "--coordinator",
            "http://127.0.0.1:9",
            "--cpu",
            "--threads",
            "1",
            "--give-up-after",
            "1",
        ])
        .arg("--scratch")
        .arg(scratch.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up promptly"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("giving up") && err.contains("127.0.0.1:9"),
        "{err}"
    );
}
