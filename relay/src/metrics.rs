//! Metric names and the Prometheus endpoint.
//!
//! Counters carry a `reason` label for drops so an operator can tell a replay flood from a
//! full queue. Nothing here names a destination or a client address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use murmur_service::{HttpLimits, RefusalCounter, serve_until};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};

pub const PACKETS_IN: &str = "murmur_relay_packets_received_total";
pub const PACKETS_FORWARDED: &str = "murmur_relay_packets_forwarded_total";
pub const PACKETS_DROPPED: &str = "murmur_relay_packets_dropped_total";
pub const FINAL_DELIVERED: &str = "murmur_relay_final_delivered_total";
pub const QUEUE_DEPTH: &str = "murmur_relay_queue_depth";
pub const HOLD_SECONDS: &str = "murmur_relay_hold_seconds";
pub const DELAY_CLAMPED: &str = "murmur_relay_delay_clamped_total";
pub const CLIENT_SESSIONS: &str = "murmur_relay_client_sessions";
pub const LINK_CONNECTS: &str = "murmur_relay_link_connects_total";
pub const REPLAY_TAGS: &str = "murmur_relay_replay_tags";
pub const EXIT_STREAMS: &str = "murmur_relay_exit_streams_total";
/// What an exit refused or ended because a bound was reached, by `reason`: `streams`,
/// `session_streams`, `buffer`, `session_buffer` (data not taken, or a destination not read,
/// until the budget frees), `partial_messages`, `session_partial_messages`, `sessions`,
/// `surbs`, `window` (client data past the granted window), `lifetime`, `no_progress`
/// (streams closed).
pub const EXIT_REFUSED: &str = "murmur_relay_exit_refused_total";
pub const LOOPS: &str = "murmur_relay_loops_total";
/// Client packets a gateway passed on after they waited for the consensus their client had
/// fetched before it (those that waited in vain are dropped as `first_hop_ahead_expired`).
pub const FIRST_HOP_WAITED: &str = "murmur_relay_first_hop_waited_total";
/// Tickets that paid this hop.
pub const TICKETS_ACCEPTED: &str = "murmur_relay_tickets_accepted_total";
/// Tickets refused, by `reason` (`PaymentRefusal::label`).
pub const TICKETS_REFUSED: &str = "murmur_relay_tickets_refused_total";
/// Accepted tickets that won.
pub const TICKETS_WON: &str = "murmur_relay_tickets_won_total";
/// The sum of accepted tickets' expected values (base units): what the relay earns on average.
pub const TICKET_VALUE_EARNED: &str = "murmur_relay_ticket_expected_value_total";
/// Packets that paid this hop nothing, by `reason`: `no_ticket` (the usual case: a client
/// pays one packet in `packets_per_ticket`) or `ticket_refused`.
pub const PACKETS_UNPAID: &str = "murmur_relay_packets_unpaid_total";
/// Client sessions a gateway ended because the client fell too far behind in paying.
pub const CLIENTS_CUT_OFF: &str = "murmur_relay_clients_cut_off_total";
/// Winning tickets stored and not yet settled.
pub const WINNERS_PENDING: &str = "murmur_relay_winners_pending";
/// Winning tickets the ledger paid.
pub const TICKETS_REDEEMED: &str = "murmur_relay_tickets_redeemed_total";
/// What the ledger paid for them (base units).
pub const REDEEMED_VALUE: &str = "murmur_relay_redeemed_value_total";
/// Redemption attempts that were not paid, by `reason` (the ledger's refusal label, `http`,
/// `unauthenticated`: an answer not signed by the ledger's key, retried like a network
/// failure).
pub const REDEMPTION_FAILURES: &str = "murmur_relay_redemption_failures_total";
/// Winning tickets that left the pending set, by `outcome`: `paid`, or why they were settled
/// unpaid (the ledger's refusal label such as `already_redeemed` or `unknown_pot`,
/// `pot_unknown` when the ledger said the pot does not exist before redemption,
/// `expired_unredeemed`, `corrupt_record`). Each unpaid one is also logged.
pub const WINNERS_SETTLED: &str = "murmur_relay_winners_settled_total";
/// Tickets a gateway accepted whose credit it holds until the ledger vouches for their pot,
/// by `result` once decided: `credited` or `refused`.
pub const CREDIT_HELD: &str = "murmur_relay_gateway_held_credit_total";
/// Client sessions' tabs at a gateway, by `how`: `resumed` (the key's tab from an earlier
/// session), `graced` (new, with grace), `prepaid` (new, its address used its grace).
pub const TABS_OPENED: &str = "murmur_relay_gateway_tabs_opened_total";
/// The relay's account balance at the ledger, as of the last redemption.
pub const LEDGER_BALANCE: &str = "murmur_relay_ledger_balance";
/// Pot lookups at the ledger, by `result`: `known`, `unknown`, `failed`, `unauthenticated`
/// (an answer not signed by the ledger's key, treated as failed).
pub const POT_LOOKUPS: &str = "murmur_relay_pot_lookups_total";

/// Connections a listener refused or closed before serving them, by `listener` (`mix`,
/// `client`) and `reason` (a cap, a handshake timeout, a failed handshake, an unknown key).
pub const CONNECTIONS_REFUSED: &str = "murmur_relay_connections_refused_total";
/// Connections that finished their handshake and hold a slot, by `listener`.
pub const CONNECTIONS_OPEN: &str = "murmur_relay_connections_open";
/// Outbound relay links that did not come up, by `reason`: `connect`, `handshake_timeout`,
/// `handshake_closed` (the listener closed or reset the connection mid-handshake) or
/// `wrong_key` (the listener could not prove the link key the consensus lists for it).
pub const LINK_DIAL_FAILURES: &str = "murmur_relay_link_dial_failures_total";
/// Relay links that were up and closed, by `direction` (`inbound`, `outbound`) and `reason`:
/// inbound `eof`, `idle_timeout`, `link_decrypt`, `bad_frame`, `replaced` (the dialer's key
/// opened more links than allowed; its oldest is closed), `key_retired` (no longer in the
/// consensus); outbound `idle`, `closed_by_peer`, `write_failed`, `write_timeout`.
pub const LINKS_CLOSED: &str = "murmur_relay_links_closed_total";

/// Counts one dropped packet.
pub fn drop_packet(reason: &'static str) {
    metrics::counter!(PACKETS_DROPPED, "reason" => reason).increment(1);
}

/// The Prometheus recorder as the relay configures it (histogram buckets), not yet installed.
pub fn builder() -> Result<PrometheusBuilder> {
    let hold_buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HOLD_SECONDS.into()), &hold_buckets)
        .map_err(|e| Error::Metrics(e.to_string()))
}

/// Bounds of the `/metrics` listener: a scraper or two, on loopback.
pub const METRICS_HTTP: HttpLimits = HttpLimits {
    max_connections: 16,
    max_connections_per_address: 8,
    header_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(30),
};

/// How often the recorder's histograms are rolled over (what the exporter's own listener did).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the recorder and serves `/metrics` (Prometheus text format) on `addr` until
/// `shutdown`, through the same capped serving loop as the directory and the ledger (a
/// per-address and a total cap, header and idle timeouts; refusals counted under
/// `murmur_relay_connections_refused_total{listener="metrics"}`). Returns once the listener
/// is bound, with its address; the task ends after `shutdown`.
pub async fn install(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let handle = builder()?
        .install_recorder()
        .map_err(|e| Error::Metrics(e.to_string()))?;
    serve(addr, handle, shutdown).await
}

/// Serves `handle`'s metrics on `addr` until `shutdown` (see [`install`]).
async fn serve(
    addr: SocketAddr,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })?;
    let tracker = TaskTracker::new();
    {
        let (handle, stop) = (handle.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
                }
            }
        });
    }
    let router = Router::new().route(
        "/metrics",
        get(move || {
            let text = handle.render();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
        }),
    );
    let refused: RefusalCounter = Arc::new(|reason| crate::admit::refuse("metrics", reason));
    let token = shutdown.child_token();
    let task = tokio::spawn(async move {
        if let Err(e) = serve_until(
            listener,
            METRICS_HTTP,
            router,
            refused,
            shutdown.cancelled_owned(),
            token,
            tracker,
        )
        .await
        {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok((bound, task))
}

/// The process's recorder for unit tests (installed once; counters are shared by every test
/// of the process, so tests compare before and after).
#[cfg(test)]
pub(crate) fn test_recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| builder().unwrap().install_recorder().unwrap())
}

/// The sum of the samples of `name` whose labels contain `labels`, in the test recorder.
#[cfg(test)]
pub(crate) fn test_counter(name: &str, labels: &str) -> f64 {
    test_recorder()
        .render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next() == Some(name) && series.contains(labels))
        .map(|(_, v)| v.parse::<f64>().unwrap_or(0.0))
        .sum()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    use super::*;

    async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(to).await.unwrap()
    }

    async fn scrape(s: &mut TcpStream) -> String {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text).await;
        text
    }

    /// Served from the process's test recorder (a recorder can be installed once).
    #[tokio::test]
    async fn metrics_are_served_within_the_per_address_cap() {
        let stop = CancellationToken::new();
        let (addr, task) = serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            test_recorder().clone(),
            stop.clone(),
        )
        .await
        .unwrap();
        metrics::counter!(LOOPS, "result" => "test").increment(3);
        let mut c = connect_from([127, 0, 0, 1], addr).await;
        let text = scrape(&mut c).await;
        assert!(
            text.contains("murmur_relay_loops_total{result=\"test\"} 3"),
            "{text}"
        );

        // One address holds at most its share; the next is closed unread, another address
        // is still served, and the refusal is counted.
        drop(c);
        // The first connection's slot is given back once its task ends.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let share = METRICS_HTTP.max_connections_per_address;
        let mut idle = Vec::new();
        for _ in 0..share {
            idle.push(connect_from([127, 0, 0, 1], addr).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut over = connect_from([127, 0, 0, 1], addr).await;
        assert_eq!(scrape(&mut over).await, "", "served over the cap");
        let mut other = connect_from([127, 0, 0, 2], addr).await;
        let text = scrape(&mut other).await;
        assert!(
            text.contains(
                "murmur_relay_connections_refused_total{listener=\"metrics\",reason=\"per_address_limit\"} 1"
            ),
            "{text}"
        );
        drop(idle);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
