//! The guard on disk: `guard.toml` in the client's state directory (the rule of when a guard
//! is kept or replaced is `murmur_protocol::directory::guard`).
//!
//! Written to a temporary file and renamed over the old one, so a crash leaves either the old
//! guard or the new one; readable by its owner only (it says which gateway the user enters
//! through).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use murmur_protocol::directory::IdentityKey;
use murmur_protocol::directory::guard::Guard;
use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const GUARD_FILE: &str = "guard.toml";

/// The largest guard file read (it holds three short lines).
const MAX_BYTES: u64 = 4096;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    /// The gateway's identity key, 64 hex digits.
    identity: String,
    chosen_at: u64,
    rotate_at: u64,
}

/// Where the guard is kept.
#[derive(Clone, Debug)]
pub struct GuardFile {
    path: PathBuf,
}

impl GuardFile {
    /// The guard file of `state_dir`, which is created (owner-only) if missing.
    pub fn in_dir(state_dir: &Path) -> anyhow::Result<GuardFile> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the state directory {}: {e}",
                state_dir.display()
            )
        })?;
        restrict(state_dir, 0o700);
        Ok(GuardFile {
            path: state_dir.join(GUARD_FILE),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored guard; `Ok(None)` if there is none yet. A file that cannot be read or
    /// parsed is an error the caller reports (the client then chooses a new guard and
    /// overwrites it).
    pub fn load(&self) -> anyhow::Result<Option<Guard>> {
        let text = match std::fs::File::open(&self.path) {
            Ok(f) => {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_BYTES), &mut text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
                text
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => anyhow::bail!("{}: {e}", self.path.display()),
        };
        let disk: OnDisk =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
        if disk.version != 1 {
            anyhow::bail!(
                "{}: version {} is not supported (expected 1)",
                self.path.display(),
                disk.version
            );
        }
        let identity = IdentityKey::from_hex(&disk.identity)
            .map_err(|e| anyhow::anyhow!("{}: identity: {e}", self.path.display()))?;
        Ok(Some(Guard {
            identity,
            chosen_at: disk.chosen_at,
            rotate_at: disk.rotate_at,
        }))
    }

    /// Stores `guard`, replacing the old one atomically.
    pub fn save(&self, guard: &Guard) -> anyhow::Result<()> {
        let text = toml::to_string(&OnDisk {
            version: 1,
            identity: guard.identity.to_hex(),
            chosen_at: guard.chosen_at,
            rotate_at: guard.rotate_at,
        })?;
        let tmp = self.path.with_extension("toml.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            restrict(&tmp, 0o600);
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write()
            .map_err(|e| anyhow::anyhow!("cannot save the guard to {}: {e}", self.path.display()))
    }
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot restrict the permissions");
    }
}

#[cfg(not(unix))]
fn restrict(_: &Path, _: u32) {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_saved_guard_loads_back_and_a_damaged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = GuardFile::in_dir(&dir.path().join("state")).unwrap();
        assert_eq!(file.load().unwrap(), None);
        let guard = Guard {
            identity: IdentityKey([7; 32]),
            chosen_at: 10,
            rotate_at: 20,
        };
        file.save(&guard).unwrap();
        assert_eq!(file.load().unwrap(), Some(guard));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
        std::fs::write(file.path(), "version = 1\nidentity = \"zz\"\n").unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(err.contains("guard.toml"), "{err}");
        std::fs::write(file.path(), vec![b'x'; 100_000]).unwrap();
        assert!(file.load().is_err());
    }
}
