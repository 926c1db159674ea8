//! Crash-safe files for identity material: temp file, fsync, rename, directory fsync; a SHA-256
//! checksum on every cached file; the previous generation kept beside the current one.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;

const CHECKSUM_PREFIX: &str = "meshkeep-sha256:";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The previous generation of a file.
pub fn previous(path: &Path) -> PathBuf {
    sibling(path, ".prev")
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a
/// torn one. The file gets `mode` before any byte is written.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = sibling(path, ".tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Writes a value as checksummed JSON, keeping the current file as the previous generation.
pub fn write_checksummed<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), Error> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| Error::Crypto(format!("cannot encode: {e}")))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &body);
    let mut bytes = format!("{CHECKSUM_PREFIX}{}\n", hex(digest.as_ref())).into_bytes();
    bytes.extend_from_slice(&body);
    if path.exists() {
        // Keep the generation in force until the new one is complete.
        let prev = previous(path);
        std::fs::copy(path, &prev).map_err(io(&prev))?;
        std::fs::File::open(&prev).and_then(|f| f.sync_all()).map_err(io(&prev))?;
    }
    write_atomic(path, &bytes, mode)
}

/// Reads a checksummed file, falling back to the previous generation when the current one is
/// missing or damaged. `Ok(None)` when neither exists.
pub fn read_checksummed<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, Error> {
    match read_one(path) {
        Ok(Some(value)) => Ok(Some(value)),
        current => {
            let prev = previous(path);
            match read_one(&prev) {
                Ok(Some(value)) => {
                    tracing::warn!(path = %path.display(), "identity file missing or damaged; using the previous generation");
                    Ok(Some(value))
                }
                Ok(None) => current,
                Err(e) => current.and(Err(e)),
            }
        }
    }
}

fn read_one<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Io { path: path.to_owned(), source }),
    };
    let damaged = || Error::Damaged { path: path.to_owned() };
    let newline = bytes.iter().position(|b| *b == b'\n').ok_or_else(damaged)?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| damaged())?;
    let expected = header.strip_prefix(CHECKSUM_PREFIX).ok_or_else(damaged)?;
    let body = &bytes[newline + 1..];
    if hex(ring::digest::digest(&ring::digest::SHA256, body).as_ref()) != expected {
        return Err(damaged());
    }
    serde_json::from_slice(body).map(Some).map_err(|_| damaged())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn checksummed_files_round_trip_and_keep_the_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/issuer.json");
        write_checksummed(&path, &"first", 0o600).unwrap();
        write_checksummed(&path, &"second", 0o600).unwrap();
        assert_eq!(read_checksummed::<String>(&path).unwrap().as_deref(), Some("second"));
        assert_eq!(read_checksummed::<String>(&previous(&path)).unwrap().as_deref(), Some("first"));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_file_falls_back_to_the_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leaf.json");
        write_checksummed(&path, &"good", 0o600).unwrap();
        write_checksummed(&path, &"newer", 0o600).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(read_checksummed::<String>(&path).unwrap().as_deref(), Some("good"));

        std::fs::write(previous(&path), b"garbage").unwrap();
        assert!(matches!(read_checksummed::<String>(&path), Err(Error::Damaged { .. })));
    }

    #[test]
    fn missing_files_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_checksummed::<String>(&dir.path().join("nope")).unwrap(), None);
    }
}
