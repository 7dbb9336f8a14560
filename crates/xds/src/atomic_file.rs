//! Writing a file atomically and durably, for the files a crash must never leave half
//! written: the last-known-good config, a node's key and certificate, the CA.
//!
//! The contents go to a temporary file in the same directory, created with `mode` (then
//! set again, past the umask), fsynced, renamed over the target, and the directory is
//! fsynced. A reader sees the old file or the new one, never a mix. Blocking: call it
//! from `spawn_blocking` in async code.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Which step failed, on which file.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct WriteError {
    /// What was being done (`cannot create`, `cannot rename to`, ...).
    pub what: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// Replaces `path` with `contents`, mode `mode` (e.g. `0o600` for secrets). The
/// directory must exist.
pub fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    let err = |what: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| WriteError { what, path, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err("cannot create", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err("cannot set permissions of", &tmp))?;
        f.write_all(contents)
            .and_then(|()| f.sync_all())
            .map_err(err("cannot write", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(err("cannot rename to", path))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(err("cannot fsync the directory", &dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn replaces_the_file_with_the_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write(&path, b"one", 0o600).unwrap();
        write(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        let missing = dir.path().join("no-such-dir/file");
        let e = write(&missing, b"x", 0o644).unwrap_err();
        assert_eq!(e.what, "cannot create");
    }
}
