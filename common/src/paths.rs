//! Where things are found on disk: the workspace root and the datasets folder.

use std::path::{Path, PathBuf};

/// The environment variable that names the datasets folder.
pub const DATASETS_DIR_ENV: &str = "DATASETS_DIR";

/// The workspace root this crate was built in (the folder above `common/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("common/ has a parent folder")
        .to_path_buf()
}

/// The datasets folder: `$DATASETS_DIR` if set, else `../shared/datasets`
/// relative to the workspace root (not to the current directory), so tests
/// find it from any crate.
pub fn datasets_dir() -> PathBuf {
    match std::env::var_os(DATASETS_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("..").join("shared").join("datasets"),
    }
}
