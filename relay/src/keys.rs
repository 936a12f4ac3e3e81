//! Sphinx keys on disk: one X25519 key per epoch together with the replay tags seen under it.
//! (The Ed25519 identity key file has the format every daemon's keys share: `murmur_service::keys`.)
//!
//! Replay state must survive `kill -9`: a packet is released to the next hop only after its
//! replay tag is on disk. Workers check-and-insert tags into the in-memory filter and queue
//! them; the flusher ([`KeyRing::flush`]) appends queued tags to the epoch's log and
//! `fdatasync`s once per batch before the batch's packets move on (group commit). Now and
//! then the filter is snapshotted and the log truncated. On start, snapshot + log rebuild the
//! filter; a torn record at the log's end belongs to a packet that was never released.
//!
//! Layout under `<state_dir>/sphinx/`: `<epoch>.key` (32-byte secret, mode 0600),
//! `<epoch>.replay` (filter snapshot with checksum), `<epoch>.log` (32-byte tags).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use murmur_protocol::directory::Epoch;
use murmur_protocol::packet::{PublicKey, ReplayTag, StaticSecret};
use murmur_protocol::replay::ReplayFilter;
use murmur_protocol::ticket::{commitment_of, reveal_from_secret};
use rand::CryptoRng;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Tags logged before the filter is snapshotted and the log truncated.
const SNAPSHOT_EVERY: u64 = 1_000_000;

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::State {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically and durably (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let _ = private;
        let mut f = opts.open(&tmp).map_err(state_err(&tmp))?;
        f.write_all(bytes).map_err(state_err(&tmp))?;
        f.sync_all().map_err(state_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(state_err(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(state_err(dir))?;
    }
    Ok(())
}

/// One epoch's Sphinx key and its replay state.
pub struct EpochKey {
    pub epoch: Epoch,
    secret: StaticSecret,
    pub public: PublicKey,
    /// The epoch's ticket reveal, derived from `secret` (secret until a ticket is redeemed).
    payment_reveal: Zeroizing<[u8; 32]>,
    payment_commitment: [u8; 32],
    replay: Mutex<ReplayState>,
    log: Mutex<ReplayLog>,
}

struct ReplayState {
    filter: ReplayFilter,
    /// Tags admitted but not yet on disk.
    pending: Vec<ReplayTag>,
}

struct ReplayLog {
    file: File,
    path: PathBuf,
    snapshot_path: PathBuf,
    since_snapshot: u64,
}

impl EpochKey {
    /// The secret, for opening packets.
    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    /// The secret reveal of this epoch's ticket commitment
    /// ([`reveal_from_secret`]` (secret)`). It must not leave the relay before the epoch has
    /// retired: redeeming a ticket shows it to the ledger.
    pub fn payment_reveal(&self) -> &Zeroizing<[u8; 32]> {
        &self.payment_reveal
    }

    /// The commitment published for this epoch: [`commitment_of`]` (payment_reveal)`.
    pub fn payment_commitment(&self) -> [u8; 32] {
        self.payment_commitment
    }

    /// Records `tag`; `true` means it was seen before (a replay, or a false positive at the
    /// filter's stated rate). A fresh tag is queued for the next [`KeyRing::flush`].
    pub fn check_and_insert(&self, tag: &ReplayTag) -> bool {
        let Ok(mut state) = self.replay.lock() else {
            // A poisoned lock means a worker panicked mid-insert: refuse rather than risk
            // admitting a replay.
            return true;
        };
        if state.filter.check_and_insert(tag) {
            return true;
        }
        state.pending.push(*tag);
        false
    }

    /// Tags in the filter and its estimated false-positive rate now.
    pub fn replay_stats(&self) -> (u64, f64) {
        self.replay
            .lock()
            .map(|s| (s.filter.len(), s.filter.false_positive_rate()))
            .unwrap_or((0, 1.0))
    }

    /// Writes queued tags to the log and syncs it. Returns how many were written.
    fn flush(&self) -> Result<usize> {
        let tags = match self.replay.lock() {
            Ok(mut s) => std::mem::take(&mut s.pending),
            Err(_) => return Ok(0),
        };
        let Ok(mut log) = self.log.lock() else {
            return Ok(0);
        };
        if tags.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::with_capacity(tags.len() * 32);
        for t in &tags {
            buf.extend_from_slice(&t.0);
        }
        let path = log.path.clone();
        log.file.write_all(&buf).map_err(state_err(&path))?;
        log.file.sync_data().map_err(state_err(&path))?;
        log.since_snapshot += tags.len() as u64;
        if log.since_snapshot >= SNAPSHOT_EVERY {
            self.snapshot(&mut log)?;
        }
        Ok(tags.len())
    }

    /// Snapshots the filter, then truncates the log. Tags admitted since the last flush are
    /// still queued and go to the fresh log at the next flush.
    fn snapshot(&self, log: &mut ReplayLog) -> Result<()> {
        let bytes = match self.replay.lock() {
            Ok(s) => s.filter.to_bytes(),
            Err(_) => return Ok(()),
        };
        write_atomic(&log.snapshot_path, &bytes, true)?;
        log.file.set_len(0).map_err(state_err(&log.path))?;
        log.file.sync_all().map_err(state_err(&log.path))?;
        log.since_snapshot = 0;
        Ok(())
    }
}

/// Sizing of every epoch's replay filter.
#[derive(Clone, Copy, Debug)]
pub struct ReplaySizing {
    pub capacity: u64,
    pub fp_rate: f64,
}

/// The Sphinx keys a relay holds: the previous epoch's (grace), the current and the next.
pub struct KeyRing {
    dir: PathBuf,
    sizing: ReplaySizing,
    keys: RwLock<BTreeMap<Epoch, Arc<EpochKey>>>,
}

impl KeyRing {
    /// Opens `<state_dir>/sphinx`, loading every key and its replay state.
    pub fn open(state_dir: &Path, sizing: ReplaySizing) -> Result<KeyRing> {
        let dir = state_dir.join("sphinx");
        std::fs::create_dir_all(&dir).map_err(state_err(&dir))?;
        let mut keys = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(state_err(&dir))? {
            let path = entry.map_err(state_err(&dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("key") {
                continue;
            }
            let Some(epoch) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<Epoch>().ok())
            else {
                continue;
            };
            keys.insert(epoch, Arc::new(load_epoch(&dir, epoch, sizing)?));
        }
        Ok(KeyRing {
            dir,
            sizing,
            keys: RwLock::new(keys),
        })
    }

    /// The key for `epoch`, if held.
    pub fn get(&self, epoch: Epoch) -> Option<Arc<EpochKey>> {
        self.keys.read().ok()?.get(&epoch).cloned()
    }

    /// Epochs held, oldest first.
    pub fn epochs(&self) -> Vec<Epoch> {
        self.keys
            .read()
            .map(|k| k.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Makes sure keys for `current` and `current + 1` exist (created durably before they
    /// are published), and drops keys older than `oldest_kept` with their replay state.
    pub fn rotate<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        current: Epoch,
        oldest_kept: Epoch,
    ) -> Result<()> {
        for epoch in [current, current.saturating_add(1)] {
            if self.get(epoch).is_some() {
                continue;
            }
            let secret = StaticSecret::random_from_rng(rng);
            write_atomic(
                &self.dir.join(format!("{epoch}.key")),
                secret.as_bytes(),
                true,
            )?;
            let key = load_epoch(&self.dir, epoch, self.sizing)?;
            if let Ok(mut keys) = self.keys.write() {
                keys.insert(epoch, Arc::new(key));
            }
        }
        let old: Vec<Epoch> = self
            .epochs()
            .into_iter()
            .filter(|&e| e < oldest_kept)
            .collect();
        for epoch in old {
            if let Ok(mut keys) = self.keys.write() {
                keys.remove(&epoch);
            }
            for ext in ["key", "replay", "log"] {
                let _ = std::fs::remove_file(self.dir.join(format!("{epoch}.{ext}")));
            }
        }
        Ok(())
    }

    /// Puts every key's queued replay tags on disk. Call before releasing the packets whose
    /// tags were admitted since the last call.
    pub fn flush(&self) -> Result<usize> {
        let keys: Vec<Arc<EpochKey>> = self
            .keys
            .read()
            .map(|k| k.values().cloned().collect())
            .unwrap_or_default();
        let mut n = 0;
        for k in keys {
            n += k.flush()?;
        }
        Ok(n)
    }
}

fn load_epoch(dir: &Path, epoch: Epoch, sizing: ReplaySizing) -> Result<EpochKey> {
    let key_path = dir.join(format!("{epoch}.key"));
    let bytes = Zeroizing::new(std::fs::read(&key_path).map_err(state_err(&key_path))?);
    let secret_bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| Error::Key {
        path: key_path.clone(),
        reason: "a Sphinx key file holds exactly 32 bytes".into(),
    })?;
    let secret = StaticSecret::from(secret_bytes);
    let snapshot_path = dir.join(format!("{epoch}.replay"));
    let mut filter = match std::fs::read(&snapshot_path) {
        Ok(bytes) => ReplayFilter::from_bytes(&bytes).map_err(|e| Error::ReplayState {
            path: snapshot_path.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ReplayFilter::new(sizing.capacity, sizing.fp_rate)?
        }
        Err(e) => return Err(state_err(&snapshot_path)(e)),
    };
    let log_path = dir.join(format!("{epoch}.log"));
    let mut since_snapshot = 0;
    match File::open(&log_path) {
        Ok(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(state_err(&log_path))?;
            // A torn last record was never released to the next hop: ignore it.
            for chunk in buf.chunks_exact(32) {
                let mut tag = [0u8; 32];
                tag.copy_from_slice(chunk);
                filter.check_and_insert(&ReplayTag(tag));
                since_snapshot += 1;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(state_err(&log_path)(e)),
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(state_err(&log_path))?;
    // Drop a torn tail so later records stay aligned.
    let len = file.metadata().map_err(state_err(&log_path))?.len();
    if len % 32 != 0 {
        file.set_len(len - len % 32).map_err(state_err(&log_path))?;
    }
    let payment_reveal = reveal_from_secret(secret.as_bytes());
    let payment_commitment = commitment_of(&payment_reveal);
    Ok(EpochKey {
        epoch,
        public: PublicKey::from(&secret),
        secret,
        payment_reveal,
        payment_commitment,
        replay: Mutex::new(ReplayState {
            filter,
            pending: Vec::new(),
        }),
        log: Mutex::new(ReplayLog {
            file,
            path: log_path,
            snapshot_path,
            since_snapshot,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const SIZING: ReplaySizing = ReplaySizing {
        capacity: 10_000,
        fp_rate: 1e-6,
    };

    #[test]
    fn replay_tags_survive_a_restart_only_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let ring = KeyRing::open(dir.path(), SIZING).unwrap();
        ring.rotate(&mut rng, 10, 9).unwrap();
        assert_eq!(ring.epochs(), vec![10, 11]);
        let key = ring.get(10).unwrap();
        let flushed = ReplayTag([1; 32]);
        let unflushed = ReplayTag([2; 32]);
        assert!(!key.check_and_insert(&flushed));
        assert!(key.check_and_insert(&flushed));
        assert_eq!(ring.flush().unwrap(), 1);
        assert!(!key.check_and_insert(&unflushed));
        let public = key.public;
        let commitment = key.payment_commitment();
        assert_eq!(commitment_of(key.payment_reveal()), commitment);
        assert_ne!(
            commitment,
            ring.get(11).unwrap().payment_commitment(),
            "one commitment per epoch"
        );
        drop((key, ring)); // a crash: the unflushed tag never reached disk

        let ring = KeyRing::open(dir.path(), SIZING).unwrap();
        let key = ring.get(10).unwrap();
        assert_eq!(key.public, public, "the key itself survives");
        assert_eq!(
            key.payment_commitment(),
            commitment,
            "and so does its reveal"
        );
        assert!(key.check_and_insert(&flushed), "flushed tag remembered");
        assert!(
            !key.check_and_insert(&unflushed),
            "unflushed tag was never admitted to disk"
        );
    }

    #[test]
    fn torn_log_tail_is_ignored_and_old_epochs_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let ring = KeyRing::open(dir.path(), SIZING).unwrap();
        ring.rotate(&mut rng, 5, 5).unwrap();
        let key = ring.get(5).unwrap();
        key.check_and_insert(&ReplayTag([7; 32]));
        ring.flush().unwrap();
        drop((key, ring));
        let log = dir.path().join("sphinx/5.log");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[9; 10]).unwrap();
        drop(f);
        let ring = KeyRing::open(dir.path(), SIZING).unwrap();
        assert!(ring.get(5).unwrap().check_and_insert(&ReplayTag([7; 32])));
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 32);
        ring.rotate(&mut rng, 7, 6).unwrap();
        assert_eq!(ring.epochs(), vec![6, 7, 8]);
        assert!(!dir.path().join("sphinx/5.key").exists());
    }

    #[test]
    fn snapshot_then_truncate_keeps_every_tag() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let ring = KeyRing::open(dir.path(), SIZING).unwrap();
        ring.rotate(&mut rng, 1, 1).unwrap();
        let key = ring.get(1).unwrap();
        key.check_and_insert(&ReplayTag([1; 32]));
        ring.flush().unwrap();
        {
            let mut log = key.log.lock().unwrap();
            key.snapshot(&mut log).unwrap();
        }
        key.check_and_insert(&ReplayTag([2; 32]));
        ring.flush().unwrap();
        drop((key, ring));
        let ring = KeyRing::open(dir.path(), SIZING).unwrap();
        let key = ring.get(1).unwrap();
        assert!(
            key.check_and_insert(&ReplayTag([1; 32])),
            "from the snapshot"
        );
        assert!(key.check_and_insert(&ReplayTag([2; 32])), "from the log");
    }
}
