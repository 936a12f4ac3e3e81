//! The authority's state, without I/O: descriptors it accepted, votes it holds, the consensus
//! it computed for each epoch and the signatures collected on it. The server and the
//! schedule drive it with documents and `now`; it answers with what to store and send.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use std::net::SocketAddr;

use murmur_protocol::directory::consensus::{VALID_EPOCHS, compute_consensus, keep_heaviest};
use murmur_protocol::directory::exit_policy::is_private;
use murmur_protocol::directory::sign::Freshness;
use murmur_protocol::directory::{
    AuthoritySet, Consensus, Descriptor, DocumentKind, DocumentSignature, Epoch, IdentityKey,
    MAX_RELAYS, NetworkParams, SignedConsensus, SignedDescriptor, SignedVote, UnixTime,
    VerifiedVote, Vote, sign_document,
};
use murmur_protocol::link::LinkPublic;

use crate::config::Config;
use crate::probes::{ProbeHistory, ProbeRound, ProbeRules, unmeasured};

/// Why a document was refused: a stable metric label, an HTTP status and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: &'static str, status: u16, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            status,
            message: message.into(),
        }
    }
}

impl From<murmur_protocol::Error> for Refusal {
    fn from(e: murmur_protocol::Error) -> Self {
        Refusal::new(e.label(), 400, e.to_string())
    }
}

/// What happened to an accepted document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// New or newer: store it.
    Stored,
    /// The same document was already held.
    Duplicate,
    /// A signature that arrived before this authority computed its consensus; it is held
    /// and counted if the digests match.
    Pending,
}

/// The rules a descriptor must meet besides its signature.
#[derive(Clone, Debug)]
pub struct AuthorityPolicy {
    pub max_price_per_packet: u64,
    pub descriptor_lifetime_s: u64,
    pub allow_private_addresses: bool,
    pub clock_skew_s: u64,
    /// Descriptors held at most.
    pub max_descriptors: usize,
    /// Vote only for relays that passed this authority's tests (else every relay, at the
    /// unmeasured weight).
    pub probing: bool,
    pub probe_rules: ProbeRules,
    /// Test packets per relay per round.
    pub probe_packets: u32,
}

impl AuthorityPolicy {
    pub fn from_config(c: &Config) -> Self {
        AuthorityPolicy {
            max_price_per_packet: c.policy.max_price_per_packet,
            descriptor_lifetime_s: c.policy.descriptor_lifetime.as_secs(),
            allow_private_addresses: c.policy.allow_private_addresses,
            clock_skew_s: c.clock_skew.as_secs(),
            max_descriptors: c.limits.max_descriptors,
            probing: c.probe.enabled,
            probe_rules: ProbeRules {
                history: c.probe.history,
                // In [0, 1000] by config validation.
                min_performance: (c.probe.min_performance * 1000.0).round() as u16,
                unmeasured_weight: c.probe.unmeasured_weight,
            },
            probe_packets: c.probe.packets,
        }
    }
}

/// A relay to test: where it listens, the link key it must prove, and a Sphinx key to send
/// it test packets under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    pub identity: IdentityKey,
    pub mix: SocketAddr,
    pub link_key: LinkPublic,
    pub key_epoch: Epoch,
    pub sphinx_key: [u8; 32],
}

struct Round {
    consensus: Consensus,
    signed: SignedConsensus,
}

/// One authority's state.
pub struct Authority {
    key: SigningKey,
    identity: IdentityKey,
    set: AuthoritySet,
    params: NetworkParams,
    policy: AuthorityPolicy,
    descriptors: BTreeMap<IdentityKey, (SignedDescriptor, Descriptor)>,
    probes: BTreeMap<IdentityKey, ProbeHistory>,
    /// When each relay's first descriptor arrived (a counter), for eviction.
    arrived: BTreeMap<IdentityKey, u64>,
    next_arrival: u64,
    /// Descriptors dropped to make room, for the caller to remove from disk.
    evicted: Vec<IdentityKey>,
    votes: BTreeMap<Epoch, BTreeMap<IdentityKey, (SignedVote, VerifiedVote)>>,
    rounds: BTreeMap<Epoch, Round>,
    pending: BTreeMap<Epoch, BTreeMap<IdentityKey, DocumentSignature>>,
}

impl Authority {
    /// An authority with no documents yet. `key` must be one of `set`.
    pub fn new(
        key: SigningKey,
        set: AuthoritySet,
        params: NetworkParams,
        policy: AuthorityPolicy,
    ) -> Result<Self, Refusal> {
        let identity = IdentityKey::of(&key);
        if !set.contains(&identity) {
            return Err(Refusal::new(
                "config",
                500,
                format!(
                    "this authority's key ({identity}) is not among the configured authorities"
                ),
            ));
        }
        Ok(Authority {
            key,
            identity,
            set,
            params,
            policy,
            descriptors: BTreeMap::new(),
            probes: BTreeMap::new(),
            arrived: BTreeMap::new(),
            next_arrival: 0,
            evicted: Vec::new(),
            votes: BTreeMap::new(),
            rounds: BTreeMap::new(),
            pending: BTreeMap::new(),
        })
    }

    pub fn identity(&self) -> IdentityKey {
        self.identity
    }

    pub fn authorities(&self) -> &AuthoritySet {
        &self.set
    }

    pub fn params(&self) -> &NetworkParams {
        &self.params
    }

    pub fn epoch_at(&self, now: UnixTime) -> Epoch {
        self.params.epoch_at(now)
    }

    pub fn descriptor_count(&self) -> usize {
        self.descriptors.len()
    }

    /// Checks a relay's upload and holds it if it is new or newer than the one held.
    pub fn accept_descriptor(
        &mut self,
        signed: SignedDescriptor,
        now: UnixTime,
    ) -> Result<Accepted, Refusal> {
        let d = signed.verify()?;
        let p = &self.policy;
        if d.published > now.saturating_add(p.clock_skew_s) {
            return Err(Refusal::new(
                "from_future",
                400,
                format!(
                    "descriptor published at {} is in the future (now {now})",
                    d.published
                ),
            ));
        }
        if d.published.saturating_add(p.descriptor_lifetime_s) < now {
            return Err(Refusal::new(
                "too_old",
                400,
                format!(
                    "descriptor published at {} is older than the {} s lifetime",
                    d.published, p.descriptor_lifetime_s
                ),
            ));
        }
        if d.price_per_packet > p.max_price_per_packet {
            return Err(Refusal::new(
                "price",
                400,
                format!(
                    "price {} per packet exceeds this authority's maximum {}",
                    d.price_per_packet, p.max_price_per_packet
                ),
            ));
        }
        let addrs = [Some(d.addresses.mix), d.addresses.client];
        if !p.allow_private_addresses && addrs.iter().flatten().any(|a| is_private(a.ip())) {
            return Err(Refusal::new(
                "private_address",
                400,
                "relay addresses must be public (this authority does not accept private ones)",
            ));
        }
        match self.descriptors.get(&d.identity) {
            Some((held, _)) if *held == signed => return Ok(Accepted::Duplicate),
            Some((_, held)) if held.published >= d.published => {
                return Err(Refusal::new(
                    "stale",
                    409,
                    format!(
                        "a descriptor published at {} is already held; publish a later one",
                        held.published
                    ),
                ));
            }
            None if self.descriptors.len() >= self.policy.max_descriptors => {
                // Full: the relay that never passed a test and arrived first makes room, so a
                // flood of descriptors nobody runs cannot keep new relays out: a newcomer has
                // as many uploads' time to be tested as the store has untested places (and
                // the prober tests newcomers at once). By arrival, not by `published`,
                // which the uploader chooses.
                let victim = self
                    .descriptors
                    .keys()
                    .filter(|id| !self.probes.get(id).is_some_and(|h| h.ever_passed))
                    .min_by_key(|id| (self.arrived.get(id).copied().unwrap_or(0), **id))
                    .copied();
                let Some(victim) = victim else {
                    return Err(Refusal::new(
                        "full",
                        503,
                        format!(
                            "this authority holds the maximum of {} relays, all tested",
                            self.policy.max_descriptors
                        ),
                    ));
                };
                self.descriptors.remove(&victim);
                self.probes.remove(&victim);
                self.arrived.remove(&victim);
                self.evicted.push(victim);
            }
            _ => {}
        }
        if !self.arrived.contains_key(&d.identity) {
            self.arrived.insert(d.identity, self.next_arrival);
            self.next_arrival += 1;
        }
        self.descriptors.insert(d.identity, (signed, d));
        Ok(Accepted::Stored)
    }

    /// Descriptors dropped to make room since the last call (to remove from disk).
    pub fn take_evicted(&mut self) -> Vec<IdentityKey> {
        std::mem::take(&mut self.evicted)
    }

    /// The relays to test at `now`: every one with a fresh descriptor (only those never
    /// tested if `untested_only`), except those that keep failing and are backing off;
    /// relays that passed last time first. Each under its Sphinx key for the current epoch,
    /// else the next.
    pub fn probe_targets(&mut self, now: UnixTime, untested_only: bool) -> Vec<ProbeTarget> {
        let epoch = self.epoch_at(now);
        let lifetime = self.policy.descriptor_lifetime_s;
        let mut targets: Vec<(bool, ProbeTarget)> = Vec::new();
        for (_, d) in self.descriptors.values() {
            if d.published.saturating_add(lifetime) < now {
                continue;
            }
            let passing = match self.probes.get_mut(&d.identity) {
                None => false,
                Some(_) if untested_only => continue,
                Some(h) => {
                    if !h.due() {
                        continue;
                    }
                    h.passing()
                }
            };
            let Some(key) = d
                .sphinx_keys
                .iter()
                .filter(|k| k.epoch >= epoch)
                .min_by_key(|k| k.epoch)
            else {
                continue;
            };
            targets.push((
                passing,
                ProbeTarget {
                    identity: d.identity,
                    mix: d.addresses.mix,
                    link_key: d.link_key,
                    key_epoch: key.epoch,
                    sphinx_key: key.key,
                },
            ));
        }
        targets.sort_by_key(|(passing, _)| !passing);
        targets.into_iter().map(|(_, t)| t).collect()
    }

    /// Records a round of tests of `relay` (ignored if its descriptor is gone).
    pub fn record_probe(&mut self, relay: &IdentityKey, round: ProbeRound) {
        if self.descriptors.contains_key(relay) {
            let keep = self.policy.probe_rules.history;
            self.probes.entry(*relay).or_default().record(round, keep);
        }
    }

    /// The test history of `relay`.
    pub fn probe_history(&self, relay: &IdentityKey) -> Option<&ProbeHistory> {
        self.probes.get(relay)
    }

    /// Makes, holds and returns this authority's vote for `epoch`: every fresh descriptor
    /// with a Sphinx key for that epoch whose relay passed this authority's tests (every one,
    /// unmeasured, if it does not test), at most `relays_per_address` per address, with what
    /// it measured.
    pub fn make_vote(
        &mut self,
        epoch: Epoch,
        now: UnixTime,
    ) -> murmur_protocol::Result<SignedVote> {
        let lifetime = self.policy.descriptor_lifetime_s;
        let p = &self.policy;
        let measured: Vec<(&Descriptor, murmur_protocol::directory::Measurement)> = self
            .descriptors
            .values()
            .filter(|(_, d)| d.published.saturating_add(lifetime) >= now)
            .filter(|(_, d)| d.sphinx_keys.iter().any(|k| k.epoch == epoch))
            .filter_map(|(_, d)| {
                let m = if p.probing {
                    self.probes.get(&d.identity)?.vote(
                        &p.probe_rules,
                        p.probe_packets,
                        d.bandwidth,
                    )?
                } else {
                    unmeasured(&p.probe_rules, d.bandwidth)
                };
                Some((d, m))
            })
            .collect();
        let kept = keep_heaviest(measured, self.params.relays_per_address, MAX_RELAYS);
        let descriptors = kept
            .into_iter()
            .filter_map(|(d, m)| {
                let (signed, _) = self.descriptors.get(&d.identity)?;
                Some((signed.clone(), m))
            })
            .collect();
        let vote = Vote::new(self.identity, epoch, now, self.params, descriptors)?;
        let signed = SignedVote::sign(&vote, &self.key)?;
        let verified = signed.verify(&self.set, Some(epoch))?;
        self.votes
            .entry(epoch)
            .or_default()
            .insert(self.identity, (signed.clone(), verified));
        Ok(signed)
    }

    /// Holds a peer's vote that was already verified (verification is slow, so callers do
    /// it without holding the state lock). Votes are taken for the next two epochs only,
    /// and not once this authority has computed that epoch's consensus.
    pub fn accept_vote(
        &mut self,
        signed: SignedVote,
        verified: VerifiedVote,
        now: UnixTime,
    ) -> Result<Accepted, Refusal> {
        let epoch = verified.vote.epoch;
        let current = self.epoch_at(now);
        if epoch <= current || epoch > current.saturating_add(2) {
            return Err(Refusal::new(
                "wrong_epoch",
                409,
                format!("a vote for epoch {epoch} is not taken now (current epoch {current})"),
            ));
        }
        let held = self.votes.entry(epoch).or_default();
        match held.get(&verified.vote.authority) {
            Some((s, _)) if *s == signed => return Ok(Accepted::Duplicate),
            Some(_) => {
                return Err(Refusal::new(
                    "conflicting_vote",
                    409,
                    format!(
                        "authority {} already sent a different vote for epoch {epoch}",
                        verified.vote.authority
                    ),
                ));
            }
            None => {}
        }
        if self.rounds.contains_key(&epoch) {
            return Err(Refusal::new(
                "late_vote",
                409,
                format!("the consensus for epoch {epoch} is already computed"),
            ));
        }
        held.insert(verified.vote.authority, (signed, verified));
        Ok(Accepted::Stored)
    }

    /// The votes held for `epoch` (served to peers that missed some).
    pub fn votes_for(&self, epoch: Epoch) -> Vec<SignedVote> {
        self.votes
            .get(&epoch)
            .map(|v| v.values().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether this authority holds a vote by `authority` for `epoch`.
    pub fn has_vote(&self, epoch: Epoch, authority: &IdentityKey) -> bool {
        self.votes
            .get(&epoch)
            .is_some_and(|v| v.contains_key(authority))
    }

    /// Computes and signs the consensus for `epoch` from the votes held, counting any
    /// signatures that arrived early. Returns this authority's signature, to send to peers.
    pub fn compute(&mut self, epoch: Epoch) -> murmur_protocol::Result<DocumentSignature> {
        let votes: Vec<VerifiedVote> = self
            .votes
            .get(&epoch)
            .map(|v| v.values().map(|(_, v)| v.clone()).collect())
            .unwrap_or_default();
        let previous = self
            .rounds
            .range(..epoch)
            .next_back()
            .map(|(_, r)| &r.consensus);
        let consensus = compute_consensus(&self.set, epoch, &votes, previous)?;
        let mut signed = SignedConsensus::unsigned(&consensus)?;
        let own = sign_document(DocumentKind::Consensus, &signed.body, &self.key);
        signed.add_signature(own.clone());
        for sig in self
            .pending
            .remove(&epoch)
            .into_iter()
            .flat_map(|m| m.into_values())
        {
            if sig.verify(DocumentKind::Consensus, &signed.body).is_ok() {
                signed.add_signature(sig);
            }
        }
        self.rounds.insert(epoch, Round { consensus, signed });
        Ok(own)
    }

    /// Takes a peer's signature on its consensus for `epoch`. It must be a configured
    /// authority's valid signature; it is counted if its digest is this authority's
    /// consensus digest, held until then if this authority has not computed yet, and refused
    /// if the two computed different documents.
    pub fn accept_signature(
        &mut self,
        epoch: Epoch,
        sig: DocumentSignature,
        now: UnixTime,
    ) -> Result<Accepted, Refusal> {
        if !self.set.contains(&sig.signer) {
            return Err(murmur_protocol::Error::UnknownSigner {
                signer: sig.signer.to_hex(),
            }
            .into());
        }
        sig.verify_digest(&sig.digest)?;
        if let Some(round) = self.rounds.get_mut(&epoch) {
            if round.signed.signatures.contains(&sig) {
                return Ok(Accepted::Duplicate);
            }
            if sig.digest != round.signed.digest() {
                return Err(Refusal::new(
                    "digest_mismatch",
                    409,
                    format!(
                        "{} signed a different consensus for epoch {epoch} than this authority \
                         computed (their votes differ)",
                        sig.signer
                    ),
                ));
            }
            round.signed.add_signature(sig);
            return Ok(Accepted::Stored);
        }
        let current = self.epoch_at(now);
        if epoch <= current || epoch > current.saturating_add(2) {
            return Err(Refusal::new(
                "wrong_epoch",
                409,
                format!(
                    "no consensus for epoch {epoch} here, and signatures for it are not taken \
                     now (current epoch {current})"
                ),
            ));
        }
        // One per authority and epoch: bounded.
        self.pending
            .entry(epoch)
            .or_default()
            .insert(sig.signer, sig);
        Ok(Accepted::Pending)
    }

    /// The consensus for `epoch` as signed so far, majority or not.
    pub fn signed(&self, epoch: Epoch) -> Option<&SignedConsensus> {
        self.rounds.get(&epoch).map(|r| &r.signed)
    }

    /// The consensus for `epoch` if it carries a strict majority of signatures (every
    /// signature held was checked on arrival).
    pub fn published(&self, epoch: Epoch) -> Option<&SignedConsensus> {
        self.signed(epoch)
            .filter(|s| s.signatures.len() >= self.set.threshold())
    }

    /// The newest published consensus that is valid at `now`.
    pub fn latest(&self, now: UnixTime) -> Option<&SignedConsensus> {
        self.rounds
            .iter()
            .rev()
            .filter(|(_, r)| r.consensus.valid_after <= now && now <= r.consensus.valid_until)
            .find_map(|(e, _)| self.published(*e))
    }

    /// Restores a consensus kept in the state directory: it must verify at `now`.
    pub fn restore_consensus(
        &mut self,
        signed: SignedConsensus,
        now: UnixTime,
    ) -> murmur_protocol::Result<Epoch> {
        let verified = signed.verify(
            &self.set,
            Freshness {
                now,
                expected_epoch: None,
                clock_skew_s: self.policy.clock_skew_s,
            },
        )?;
        let epoch = verified.consensus.epoch;
        self.rounds.insert(
            epoch,
            Round {
                consensus: verified.consensus,
                signed,
            },
        );
        Ok(epoch)
    }

    /// Drops what no longer matters at `now`: descriptors past their lifetime (returned, so
    /// the caller removes them from disk), votes, pending signatures and consensus documents
    /// of epochs whose consensus has expired.
    pub fn prune(&mut self, now: UnixTime) -> Vec<IdentityKey> {
        let lifetime = self.policy.descriptor_lifetime_s;
        let old: Vec<IdentityKey> = self
            .descriptors
            .iter()
            .filter(|(_, (_, d))| d.published.saturating_add(lifetime) < now)
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            self.descriptors.remove(id);
            self.probes.remove(id);
            self.arrived.remove(id);
        }
        let keep_from = self
            .epoch_at(now)
            .saturating_sub(u32::try_from(VALID_EPOCHS).unwrap_or(u32::MAX));
        self.votes = self.votes.split_off(&keep_from);
        self.pending = self.pending.split_off(&keep_from);
        // Keep the newest round whatever its age: the next consensus's layers follow it.
        let newest = self.rounds.keys().next_back().copied();
        self.rounds
            .retain(|e, _| *e >= keep_from || Some(*e) == newest);
        old
    }
}
