//! What the running client reports of itself: the gateway, the consensus, streams, packets
//! and what it paid to whom. One snapshot type ([`Status`]) serves the JSON answer of the
//! control endpoint, the text `murmur-client status` prints, and the Prometheus metrics.

use std::fmt::{self, Write as _};

use murmur_protocol::send_timing::{SendTimingReport, SendVerdict};
use serde::{Deserialize, Serialize};

/// The client's state at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_s: u64,
    /// Where the proxies listen.
    pub listeners: Listeners,
    /// `None` until a session has started.
    pub gateway: Option<GatewayStatus>,
    /// `None` until a consensus was fetched.
    pub consensus: Option<ConsensusStatus>,
    pub streams: StreamStatus,
    pub traffic: TrafficStatus,
    /// `None` when the client does not pay.
    pub payments: Option<PaymentStatus>,
    /// Why new streams are refused, if they are (the spending cap).
    pub refusing_new_streams: Option<String>,
    /// The KS test of the session's recent send gaps against the published rates; `None`
    /// before a session reported.
    pub send_timing: Option<SendTimingReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Listeners {
    pub socks: String,
    pub http: Option<String>,
    pub control: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// The gateway's identity key (hex).
    pub identity: String,
    pub address: String,
    pub connected: bool,
    /// Why this gateway (`murmur_protocol::directory::guard::GuardChoice::label`).
    pub choice: String,
    /// The stored guard: when it was chosen and when it rotates (Unix seconds); `None`
    /// without a state directory.
    pub guard_chosen_at: Option<u64>,
    pub guard_rotates_at: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsensusStatus {
    pub epoch: u64,
    pub valid_after: u64,
    pub fresh_until: u64,
    pub valid_until: u64,
    /// Whether `now` lies within its validity.
    pub valid: bool,
    pub relays: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    /// Streams the session holds now.
    pub open: usize,
    /// Proxy connections accepted, and streams opened through them, since start.
    pub accepted: u64,
    pub opened: u64,
    /// Refused: a bad SOCKS or HTTP request, the exit or the session said no, over the
    /// connection cap.
    pub refused_handshake: u64,
    pub refused_by_exit: u64,
    pub over_limit: u64,
    /// Opens refused at the spending cap.
    pub refused_spend: u64,
    /// Streams the session gave up on (no acknowledgement, no path, exit left).
    pub failed: u64,
    /// Connections to the HTTP CONNECT proxy, and its refusals of requests it does not
    /// tunnel (plain HTTP, malformed, too large).
    pub http_accepted: u64,
    pub http_refused: u64,
    /// Targets given as an IP address (the application resolved the name itself), and
    /// those refused under `safe = "refuse"`.
    pub ip_literal_targets: u64,
    pub ip_literal_refused: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficStatus {
    pub real_sent: u64,
    pub cover_sent: u64,
    pub loops_sent: u64,
    pub loops_returned: u64,
    pub loops_missing: u64,
    pub retransmits: u64,
    /// Real packets sent without a SURB-ACK (reply blocks and acks alone, never re-sent).
    #[serde(default)]
    pub unacknowledged_sent: u64,
    pub replies: u64,
    pub acks: u64,
    pub frames_dropped: u64,
    pub gateway_connect_failures: u64,
    /// Ticks of the send schedule that found no packet built (a gap an observer could see),
    /// and loop ticks that sent drop cover for want of a built loop.
    #[serde(default)]
    pub ticks_missed: u64,
    #[serde(default)]
    pub loops_as_drops: u64,
    /// Cover packets that could not be built (no route at the time).
    #[serde(default)]
    pub cover_unbuilt: u64,
    /// Reply blocks handed to exits; of the blocks built, those the worker pool built ahead,
    /// and those of its stock thrown away unused (an epoch ended, a relay was suspected).
    #[serde(default)]
    pub reply_blocks_sent: u64,
    #[serde(default)]
    pub reply_blocks_prebuilt: u64,
    #[serde(default)]
    pub prebuilt_blocks_discarded: u64,
    /// Packets the worker pool built for the send schedule (the rest the session thread built
    /// when the pool's queue was full), and packets whose build failed (a bug).
    #[serde(default)]
    pub packets_built_by_workers: u64,
    #[serde(default)]
    pub packets_unbuilt: u64,
    /// Deliveries dropped at the session's full queue; of those, the ones paid for all the
    /// same (the gateway charged them), and the ones past the bound that were not.
    #[serde(default)]
    pub deliveries_dropped: u64,
    #[serde(default)]
    pub dropped_deliveries_paid: u64,
    #[serde(default)]
    pub deliveries_dropped_unpaid: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PaymentStatus {
    /// The pot's key (hex).
    pub pot: String,
    /// As the ledger last reported it: the balance tickets may draw on, and the largest face
    /// value it covers. `None` before the first answer.
    pub pot_balance: Option<u64>,
    pub pot_face_cap: Option<u64>,
    /// The payer's estimate of what the pot can still pay: the ledger's balance less the
    /// tickets signed since the last check.
    pub pot_estimate: u64,
    /// The expected value of every ticket signed since start (what the client has paid, on
    /// average; relays redeem the winners later).
    pub spent: u64,
    pub max_spend: Option<u64>,
    pub tickets: u64,
    pub gateway_tickets: u64,
    /// Tickets due that the pot could not cover.
    pub unpayable: u64,
    /// Per relay, sorted by identity.
    pub relays: Vec<RelayPayment>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayPayment {
    pub identity: String,
    /// Packets (or frames, for the gateway) it carried.
    pub packets: u64,
    /// The expected value of the tickets it was given, and what is owed below a ticket.
    pub paid: u64,
    pub owed: u64,
    pub tickets: u64,
}

impl Status {
    /// The text `murmur-client status` prints.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "murmur-client {} up {}s; SOCKS5 {}{}; control {}",
            self.version,
            self.uptime_s,
            self.listeners.socks,
            self.listeners
                .http
                .as_ref()
                .map(|h| format!(", HTTP CONNECT {h}"))
                .unwrap_or_default(),
            self.listeners.control
        );
        match &self.gateway {
            Some(g) => {
                let _ = writeln!(
                    out,
                    "gateway   {} at {} ({}; guard {}{})",
                    g.identity,
                    g.address,
                    if g.connected {
                        "connected"
                    } else {
                        "not connected"
                    },
                    g.choice,
                    g.guard_rotates_at
                        .map(|t| format!(", rotates at {t}"))
                        .unwrap_or_default()
                );
            }
            None => out.push_str("gateway   none yet\n"),
        }
        match &self.consensus {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "consensus epoch {} ({}), {} relays, valid {}..{}",
                    c.epoch,
                    if c.valid { "valid" } else { "NOT VALID" },
                    c.relays,
                    c.valid_after,
                    c.valid_until
                );
            }
            None => out.push_str("consensus none yet\n"),
        }
        let s = &self.streams;
        let _ = writeln!(
            out,
            "streams   {} open; {} opened, {} refused by the exit, {} bad requests, {} over the \
             connection cap, {} at the spending cap, {} failed",
            s.open,
            s.opened,
            s.refused_by_exit,
            s.refused_handshake,
            s.over_limit,
            s.refused_spend,
            s.failed
        );
        if s.http_accepted > 0 || s.ip_literal_targets > 0 {
            let _ = writeln!(
                out,
                "          {} HTTP CONNECT connections ({} requests refused); {} targets given as \
                 IP addresses ({} refused)",
                s.http_accepted, s.http_refused, s.ip_literal_targets, s.ip_literal_refused
            );
        }
        let t = &self.traffic;
        let _ = writeln!(
            out,
            "packets   {} real ({} without a SURB-ACK), {} cover, {} loops ({} back, {} missing), \
             {} retransmitted, {} replies, {} acks, {} dropped at the link, {} ticks missed",
            t.real_sent,
            t.unacknowledged_sent,
            t.cover_sent,
            t.loops_sent,
            t.loops_returned,
            t.loops_missing,
            t.retransmits,
            t.replies,
            t.acks,
            t.frames_dropped,
            t.ticks_missed
        );
        if let Some(st) = &self.send_timing {
            let _ = write!(
                out,
                "schedule  {}: {} gaps at {:.1}/s, published {:.1}/s",
                st.verdict.label(),
                st.gaps,
                st.measured_rate_per_s,
                st.rate_per_s
            );
            if let (Some(d), Some(p)) = (st.ks_statistic, st.p_value) {
                let _ = write!(out, "; KS D = {d:.4}, p = {p:.3}");
            }
            out.push('\n');
        }
        match &self.payments {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "pot       {}: balance {} at the ledger, about {} left; spent {}{}; {} \
                     tickets ({} to the gateway), {} unpayable",
                    p.pot,
                    p.pot_balance
                        .map_or_else(|| "unknown".to_owned(), |b| b.to_string()),
                    p.pot_estimate,
                    p.spent,
                    p.max_spend
                        .map(|m| format!(" of at most {m}"))
                        .unwrap_or_default(),
                    p.tickets + p.gateway_tickets,
                    p.gateway_tickets,
                    p.unpayable
                );
                for r in &p.relays {
                    let _ = writeln!(
                        out,
                        "  relay {}  carried {:>8}  paid {:>10}  owed {:>8}  tickets {}",
                        r.identity, r.packets, r.paid, r.owed, r.tickets
                    );
                }
            }
            None => out.push_str("pot       none (the client does not pay)\n"),
        }
        if let Some(why) = &self.refusing_new_streams {
            let _ = writeln!(out, "REFUSING NEW STREAMS: {why}");
        }
        out
    }

    /// The same figures in Prometheus' text format (`murmur_client_*`).
    pub fn render_prometheus(&self) -> String {
        let mut m = Metrics::default();
        m.gauge("murmur_client_uptime_seconds", "", self.uptime_s);
        m.gauge(
            "murmur_client_gateway_connected",
            "",
            u64::from(self.gateway.as_ref().is_some_and(|g| g.connected)),
        );
        if let Some(c) = &self.consensus {
            m.gauge("murmur_client_consensus_epoch", "", c.epoch);
            m.gauge("murmur_client_consensus_valid_until", "", c.valid_until);
            m.gauge("murmur_client_consensus_valid", "", u64::from(c.valid));
            m.gauge("murmur_client_consensus_relays", "", c.relays as u64);
        }
        let s = &self.streams;
        m.gauge("murmur_client_streams_open", "", s.open as u64);
        m.counter("murmur_client_connections_accepted_total", "", s.accepted);
        m.counter("murmur_client_streams_opened_total", "", s.opened);
        for (reason, n) in [
            ("bad_request", s.refused_handshake),
            ("exit", s.refused_by_exit),
            ("connection_cap", s.over_limit),
            ("spend_cap", s.refused_spend),
        ] {
            m.counter(
                "murmur_client_streams_refused_total",
                &format!("reason=\"{reason}\""),
                n,
            );
        }
        m.counter("murmur_client_streams_failed_total", "", s.failed);
        m.counter("murmur_client_http_connections_total", "", s.http_accepted);
        m.counter("murmur_client_http_refused_total", "", s.http_refused);
        m.counter(
            "murmur_client_ip_literal_targets_total",
            "",
            s.ip_literal_targets,
        );
        m.counter(
            "murmur_client_ip_literal_refused_total",
            "",
            s.ip_literal_refused,
        );
        let t = &self.traffic;
        for (kind, n) in [
            ("real", t.real_sent),
            ("cover", t.cover_sent),
            ("loop", t.loops_sent),
        ] {
            m.counter(
                "murmur_client_packets_sent_total",
                &format!("kind=\"{kind}\""),
                n,
            );
        }
        m.counter("murmur_client_loops_returned_total", "", t.loops_returned);
        m.counter("murmur_client_loops_missing_total", "", t.loops_missing);
        m.counter("murmur_client_retransmits_total", "", t.retransmits);
        m.counter(
            "murmur_client_unacknowledged_sent_total",
            "",
            t.unacknowledged_sent,
        );
        m.counter("murmur_client_replies_total", "", t.replies);
        m.counter("murmur_client_acks_total", "", t.acks);
        m.counter("murmur_client_frames_dropped_total", "", t.frames_dropped);
        m.counter("murmur_client_send_ticks_missed_total", "", t.ticks_missed);
        m.counter("murmur_client_loops_as_drops_total", "", t.loops_as_drops);
        m.counter("murmur_client_cover_unbuilt_total", "", t.cover_unbuilt);
        m.counter(
            "murmur_client_packets_built_by_workers_total",
            "",
            t.packets_built_by_workers,
        );
        m.counter("murmur_client_packets_unbuilt_total", "", t.packets_unbuilt);
        m.counter(
            "murmur_client_reply_blocks_sent_total",
            "",
            t.reply_blocks_sent,
        );
        m.counter(
            "murmur_client_reply_blocks_prebuilt_total",
            "",
            t.reply_blocks_prebuilt,
        );
        m.counter(
            "murmur_client_prebuilt_blocks_discarded_total",
            "",
            t.prebuilt_blocks_discarded,
        );
        // Three counters, not one by fate: the session pays for a drop a moment after the
        // driver counts it, and a counter derived from their difference could go down.
        m.counter(
            "murmur_client_deliveries_dropped_total",
            "",
            t.deliveries_dropped,
        );
        m.counter(
            "murmur_client_dropped_deliveries_paid_total",
            "",
            t.dropped_deliveries_paid,
        );
        m.counter(
            "murmur_client_deliveries_dropped_unpaid_total",
            "",
            t.deliveries_dropped_unpaid,
        );
        m.counter(
            "murmur_client_gateway_connect_failures_total",
            "",
            t.gateway_connect_failures,
        );
        if let Some(p) = &self.payments {
            if let Some(b) = p.pot_balance {
                m.gauge("murmur_client_pot_balance", "", b);
            }
            m.gauge("murmur_client_pot_estimate", "", p.pot_estimate);
            m.counter("murmur_client_spent_total", "", p.spent);
            if let Some(cap) = p.max_spend {
                m.gauge("murmur_client_max_spend", "", cap);
            }
            m.counter("murmur_client_tickets_total", "to=\"hop\"", p.tickets);
            m.counter(
                "murmur_client_tickets_total",
                "to=\"gateway\"",
                p.gateway_tickets,
            );
            m.counter("murmur_client_tickets_unpayable_total", "", p.unpayable);
            for r in &p.relays {
                let label = format!("relay=\"{}\"", r.identity);
                m.counter("murmur_client_relay_packets_total", &label, r.packets);
                m.counter("murmur_client_relay_paid_total", &label, r.paid);
                m.gauge("murmur_client_relay_owed", &label, r.owed);
            }
        }
        if let Some(st) = &self.send_timing {
            m.gauge("murmur_client_send_gaps", "", st.gaps);
            m.gauge("murmur_client_send_rate_per_second", "", st.rate_per_s);
            m.gauge(
                "murmur_client_send_rate_measured_per_second",
                "",
                st.measured_rate_per_s,
            );
            if let (Some(d), Some(p)) = (st.ks_statistic, st.p_value) {
                m.gauge("murmur_client_send_gaps_ks_statistic", "", d);
                m.gauge("murmur_client_send_gaps_ks_p_value", "", p);
            }
            for verdict in [SendVerdict::TooFew, SendVerdict::Passes, SendVerdict::Fails] {
                m.gauge(
                    "murmur_client_send_timing",
                    &format!("verdict=\"{}\"", verdict.label()),
                    u64::from(st.verdict == verdict),
                );
            }
        }
        m.gauge(
            "murmur_client_refusing_new_streams",
            "",
            u64::from(self.refusing_new_streams.is_some()),
        );
        m.out
    }
}

/// Prometheus text, each metric's TYPE line written once, before its first sample.
#[derive(Default)]
struct Metrics {
    out: String,
    typed: Vec<&'static str>,
}

impl Metrics {
    fn sample(&mut self, name: &'static str, kind: &str, labels: &str, value: impl fmt::Display) {
        if !self.typed.contains(&name) {
            self.typed.push(name);
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
        }
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }
    fn gauge(&mut self, name: &'static str, labels: &str, value: impl fmt::Display) {
        self.sample(name, "gauge", labels, value);
    }
    fn counter(&mut self, name: &'static str, labels: &str, value: u64) {
        self.sample(name, "counter", labels, value);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn sample() -> Status {
        Status {
            version: "0.1.0".into(),
            uptime_s: 12,
            gateway: Some(GatewayStatus {
                identity: "ab".repeat(32),
                address: "127.0.0.1:9000".into(),
                connected: true,
                choice: "kept".into(),
                ..GatewayStatus::default()
            }),
            payments: Some(PaymentStatus {
                pot: "cd".repeat(32),
                pot_balance: Some(1000),
                spent: 40,
                max_spend: Some(50),
                relays: vec![RelayPayment {
                    identity: "ef".repeat(32),
                    packets: 10,
                    paid: 30,
                    owed: 2,
                    tickets: 1,
                }],
                ..PaymentStatus::default()
            }),
            refusing_new_streams: Some("the spending cap is reached".into()),
            send_timing: Some(SendTimingReport {
                packets: 5001,
                gaps: 4096,
                rate_per_s: 102.0,
                measured_rate_per_s: 101.5,
                ks_statistic: Some(0.0123),
                p_value: Some(0.57),
                verdict: SendVerdict::Passes,
            }),
            ..Status::default()
        }
    }

    #[test]
    fn json_round_trips() {
        let s = sample();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
    }

    #[test]
    fn text_names_the_gateway_the_spend_and_a_refusal() {
        let text = sample().render_text();
        assert!(text.contains(&"ab".repeat(32)), "{text}");
        assert!(text.contains("spent 40 of at most 50"), "{text}");
        assert!(text.contains("REFUSING NEW STREAMS"), "{text}");
        assert!(
            text.contains("schedule  passes: 4096 gaps at 101.5/s, published 102.0/s; KS D = 0.0123, p = 0.570"),
            "{text}"
        );
    }

    #[test]
    fn prometheus_types_each_metric_once() {
        let text = sample().render_prometheus();
        assert_eq!(
            text.matches("# TYPE murmur_client_streams_refused_total counter")
                .count(),
            1
        );
        assert!(text.contains(&format!(
            "murmur_client_relay_paid_total{{relay=\"{}\"}} 30",
            "ef".repeat(32)
        )));
        assert!(text.contains("murmur_client_pot_balance 1000"));
        assert!(
            text.contains("murmur_client_send_gaps_ks_p_value 0.57"),
            "{text}"
        );
        assert!(text.contains("murmur_client_send_timing{verdict=\"passes\"} 1"));
        assert!(text.contains("murmur_client_send_timing{verdict=\"fails\"} 0"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok_and(f64::is_finite), "{line}");
        }
    }
}
