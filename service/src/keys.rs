//! Secret key files, one format for every daemon's keys (an authority's or the ledger's
//! identity, a relay's identity and link keys, a client's pot key): 64 hex digits of the
//! secret and a newline, in a file only its owner can read.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::link::{LinkPublic, LinkSecret};
use zeroize::Zeroizing;

/// Why a key file cannot be written or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file cannot be read, written or parsed, or others can read it.
    #[error("key file {path}: {message}")]
    Unusable { path: PathBuf, message: String },
    /// `keygen` never overwrites a key.
    #[error("key file {0} already exists; refusing to overwrite it (move it away first)")]
    Exists(PathBuf),
}

/// Result with a key file error.
pub type Result<T> = std::result::Result<T, KeyError>;

fn key_error(path: &Path, message: impl Into<String>) -> KeyError {
    KeyError::Unusable {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Lower-case hex, built inside the zeroized buffer so no copy of the secret lingers.
fn secret_hex(secret: &[u8; 32]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(65));
    for b in secret {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Writes 32 secret bytes to `path` as hex (mode 0600, synced), refusing to overwrite.
fn write_secret(path: &Path, secret: &[u8; 32]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists(path.to_owned()),
            _ => key_error(path, format!("cannot create: {e}")),
        })?;
    let mut hex = secret_hex(secret);
    hex.push('\n');
    file.write_all(hex.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| key_error(path, format!("cannot write: {e}")))
}

/// Reads 32 secret bytes written by [`write_secret`]. Refuses a file that others can read.
fn read_secret(path: &Path, what: &str) -> Result<Zeroizing<[u8; 32]>> {
    let meta = std::fs::metadata(path).map_err(|e| {
        key_error(
            path,
            format!("cannot read: {e} (create one with the daemon's `keygen --out FILE`)"),
        )
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(key_error(
            path,
            "is readable by other users; run `chmod 600` on it",
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| key_error(path, format!("cannot read: {e}")))?,
    );
    // A secret has the shape of an identity's hex; reuse its parser.
    let bytes = IdentityKey::from_hex(text.trim())
        .map_err(|_| key_error(path, format!("must hold 64 hex digits ({what})")))?;
    Ok(Zeroizing::new(bytes.0))
}

/// Generates a key and writes it to `path` (mode 0600), refusing to overwrite anything.
/// Returns the public identity.
pub fn keygen(path: &Path) -> Result<IdentityKey> {
    // The thread RNG is a CSPRNG seeded from the operating system.
    let key = SigningKey::generate(&mut rand::rng());
    write_secret(path, &Zeroizing::new(key.to_bytes()))?;
    Ok(IdentityKey::of(&key))
}

/// Reads the key at `path`. Refuses a file that others can read.
pub fn load(path: &Path) -> Result<SigningKey> {
    let seed = read_secret(path, "an Ed25519 secret seed")?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Generates a static X25519 link key (Noise) and writes it to `path` (mode 0600), refusing
/// to overwrite anything. Returns the public key to publish.
pub fn link_keygen(path: &Path) -> Result<LinkPublic> {
    let key = LinkSecret::generate(&mut rand::rng());
    write_secret(path, &key.to_bytes())?;
    Ok(key.public())
}

/// Reads the link key at `path`. Refuses a file that others can read.
pub fn load_link(path: &Path) -> Result<LinkSecret> {
    Ok(LinkSecret::from_bytes(*read_secret(
        path,
        "an X25519 link secret",
    )?))
}

/// Reads the link key at `path`, or creates it there on first use (a relay upgraded from a
/// version without link keys gets one on its next start).
pub fn load_or_create_link(path: &Path) -> Result<LinkSecret> {
    if !path.exists() {
        link_keygen(path)?;
        tracing::info!(path = %path.display(), "created a link key");
    }
    load_link(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_private_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let id = keygen(&path).unwrap();
        let key = load(&path).unwrap();
        assert_eq!(IdentityKey::of(&key), id);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(keygen(&path), Err(KeyError::Exists(_))));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("chmod"));
    }

    #[test]
    fn link_keys_are_written_private_once_and_created_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link.key");
        let created = load_or_create_link(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_link(&path).unwrap().public(), created.public());
        assert_eq!(
            load_or_create_link(&path).unwrap().public(),
            created.public()
        );
        assert!(matches!(link_keygen(&path), Err(KeyError::Exists(_))));
    }
}
