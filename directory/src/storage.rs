//! The state directory: one file per relay descriptor and per consensus, in their canonical
//! encodings, each written to a temporary file and renamed into place so a crash never leaves
//! half a document.
//!
//! ```text
//! state/descriptors/<relay identity hex>   postcard SignedDescriptor
//! state/consensus/<epoch>                   postcard SignedConsensus (with its signatures)
//! ```

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use murmur_protocol::directory::{
    Epoch, IdentityKey, SignedConsensus, SignedDescriptor, decode, encode,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// The state directory of one authority.
#[derive(Debug)]
pub struct Storage {
    descriptors: PathBuf,
    consensus: PathBuf,
    counter: AtomicU64,
}

fn state_error(path: &Path, source: std::io::Error) -> Error {
    Error::State {
        path: path.to_owned(),
        source,
    }
}

impl Storage {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let descriptors = dir.join("descriptors");
        let consensus = dir.join("consensus");
        for d in [dir, &descriptors, &consensus] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| state_error(d, e))?;
        }
        Ok(Storage {
            descriptors,
            consensus,
            counter: AtomicU64::new(0),
        })
    }

    /// Every stored descriptor that decodes; unreadable files are reported and skipped.
    pub fn load_descriptors(&self) -> Vec<SignedDescriptor> {
        load_all(&self.descriptors)
    }

    /// Every stored consensus that decodes.
    pub fn load_consensus(&self) -> Vec<SignedConsensus> {
        load_all(&self.consensus)
    }

    pub async fn save_descriptor(&self, d: &SignedDescriptor) -> Result<()> {
        let name = d.signature.signer.to_hex();
        self.write(&self.descriptors, &name, d).await
    }

    pub async fn remove_descriptor(&self, identity: &IdentityKey) -> Result<()> {
        let path = self.descriptors.join(identity.to_hex());
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(state_error(&path, e)),
            _ => Ok(()),
        }
    }

    pub async fn save_consensus(&self, epoch: Epoch, doc: &SignedConsensus) -> Result<()> {
        self.write(&self.consensus, &epoch.to_string(), doc).await
    }

    /// Removes consensus files of epochs before `keep_from`.
    pub async fn prune_consensus(&self, keep_from: Epoch) -> Result<()> {
        let mut dir = tokio::fs::read_dir(&self.consensus)
            .await
            .map_err(|e| state_error(&self.consensus, e))?;
        while let Some(entry) = dir
            .next_entry()
            .await
            .map_err(|e| state_error(&self.consensus, e))?
        {
            let old = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Epoch>().ok())
                .is_some_and(|e| e < keep_from);
            if old {
                tokio::fs::remove_file(entry.path())
                    .await
                    .map_err(|e| state_error(&entry.path(), e))?;
            }
        }
        Ok(())
    }

    async fn write<T: Serialize>(&self, dir: &Path, name: &str, doc: &T) -> Result<()> {
        let bytes = encode(doc)?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{n}.tmp"));
        let path = dir.join(name);
        tokio::fs::write(&tmp, &bytes)
            .await
            .map_err(|e| state_error(&tmp, e))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| state_error(&path, e))
    }
}

fn load_all<T: Serialize + DeserializeOwned>(dir: &Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            let _ = std::fs::remove_file(&path); // a temporary file left by a crash
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| decode::<T>(&b).map_err(|e| e.to_string()))
        {
            Ok(doc) => out.push(doc),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping unreadable state file")
            }
        }
    }
    out
}
