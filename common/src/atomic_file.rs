//! Atomic file replacement: a reader sees either the old file or the whole
//! new one, never a partial write, also across a crash or a full disk.
//!
//! The bytes go to a temporary file in the destination's directory, which is
//! flushed to disk, renamed over the destination, and then the directory
//! itself is synced so that the rename is durable.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_dir(dir)
}

/// Flushes a directory's entries (renames, creations) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["a.bin"]);
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("a.bin");
        let err = write_atomic(&path, b"x").unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    /// A write that fails part-way (here at a 64 KiB file-size limit, as at
    /// a full disk) leaves neither the file nor a temporary one. The write
    /// runs in a child process (this test binary again), so that the limit
    /// binds nothing else.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_write_that_fails_midway_leaves_no_file() {
        use std::os::unix::process::CommandExt;
        const CHILD: &str = "DISTILL_ATOMIC_FILE_TEST_DIR";
        const NAME: &str = "atomic_file::tests::a_write_that_fails_midway_leaves_no_file";
        if let Some(dir) = std::env::var_os(CHILD) {
            let dir = Path::new(&dir);
            let err = write_atomic(&dir.join("big.bin"), &vec![7u8; 1 << 20]).unwrap_err();
            assert!(err.to_string().contains("big.bin"), "{err}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
            .env(CHILD, dir.path());
        // SAFETY: signal and setrlimit are async-signal-safe and change only
        // the child between fork and exec.
        unsafe {
            child.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: 64 * 1024,
                    rlim_max: 64 * 1024,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(
            stdout.contains("1 passed"),
            "the child ran the write: {stdout}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
