//! The simulated world at both ends of the streams: the clients' applications (page loads
//! as a Poisson process, bulk downloads back to back) and the web server behind the exit,
//! which answers a whole request with the page's bytes after a delay and then closes. An
//! application writes its request once its stream opened, as behind the client's SOCKS
//! proxy, which answers CONNECT only when the exit has opened the stream.
//!
//! A stream's target names its page (`p{index}.sim`), so the server knows what to send and
//! the simulator can time the stream at both ends; the exit treats it as any host name.

use std::collections::{BTreeMap, BTreeSet};

use murmur_protocol::exit::{ExitEvent, ExitSession, StreamKey};
use murmur_protocol::session::{ClientSession, Event};
use murmur_protocol::stream::{Refusal, StreamId, Target};
use murmur_protocol::time::Instant;
use rand::RngExt;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use super::report::PageRow;
use crate::scenario::Streams;

/// Page loads and downloads remembered at once (the rows of `streams.csv`); later ones are
/// not started and are counted.
const MAX_PAGES: usize = 4_000_000;

/// The largest read granted at once (the exit asks for at most a window).
const MAX_READ: usize = 1 << 20;

/// What a stream fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PageKind {
    Page,
    Bulk,
}

struct Page {
    client: u32,
    kind: PageKind,
    bytes: u64,
    started: u64,
    in_window: bool,
    /// When the packet that opened it left the client, and when it reached the exit.
    sent: Option<u64>,
    at_exit: Option<u64>,
    first_byte: Option<u64>,
    done: Option<u64>,
    failed: Option<u8>,
    received: u64,
}

impl Page {
    fn resolved(&self) -> bool {
        self.done.is_some() || self.failed.is_some()
    }
}

/// Where a stream's request is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Request {
    /// Not written until the stream opened: the client's proxy answers the application's
    /// CONNECT only then.
    Waiting,
    /// Bytes still to write.
    Left(usize),
    /// Written and the stream's sending side closed.
    Sent,
}

/// One client's application.
#[derive(Default)]
struct App {
    /// Open streams: their page, and their request.
    open: BTreeMap<StreamId, (u32, Request)>,
    /// A download client's next start, once its download ended.
    next_start: Option<u64>,
}

/// The server's side of one stream.
struct Conn {
    page: u32,
    request_seen: u64,
    scheduled: bool,
    ready: bool,
    to_send: u64,
    grant: Option<usize>,
    closed_sent: bool,
}

/// The applications, the server, and the exit's reply-block stock as they see it.
pub struct Web {
    cfg: Streams,
    rng: ChaCha20Rng,
    end: u64,
    pages: Vec<Page>,
    apps: Vec<App>,
    conns: BTreeMap<StreamKey, Conn>,
    by_page: BTreeMap<u32, StreamKey>,
    /// Pages started in the window and not resolved yet.
    unresolved: u64,
    zeros: Vec<u8>,
    /// Exit sessions with data to send and no reply block, now.
    starving: BTreeSet<u64>,
    pub counts: WebCounts,
}

/// What the applications and the server counted.
#[derive(Debug, Default, Clone, Serialize)]
pub struct WebCounts {
    /// Page loads not started: the client had `max_open_per_client` streams open.
    pub skipped_busy: u64,
    /// Not started: `MAX_PAGES` reached, or the session refused to open the stream.
    pub skipped_full: u64,
    pub open_refused: u64,
    /// Exit sessions that ran out of reply blocks with data waiting (in the window).
    pub starvation_events: u64,
    /// Samples of the exit's stock: across sessions, and per session with a stream open.
    pub stock_samples: u64,
    pub stock_sum: f64,
    pub session_stock_samples: u64,
    pub session_stock_sum: f64,
    pub session_stock_empty: u64,
    /// Exit events the server could not place, and driver calls the exit refused.
    pub server_errors: u64,
}

/// The reply-block stock figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct StockFigures {
    pub exit_mean: Option<f64>,
    pub session_mean: Option<f64>,
    pub session_empty_fraction: Option<f64>,
    pub starvation_events: u64,
}

fn exp_ns(rng: &mut ChaCha20Rng, rate: f64) -> u64 {
    let u: f64 = rng.random::<f64>();
    ((-(1.0 - u).ln() / rate) * 1e9) as u64
}

impl Web {
    pub fn new(cfg: &Streams, rng: ChaCha20Rng) -> Web {
        Web {
            cfg: cfg.clone(),
            rng,
            end: 0,
            pages: Vec::new(),
            apps: Vec::new(),
            conns: BTreeMap::new(),
            by_page: BTreeMap::new(),
            unresolved: 0,
            zeros: Vec::new(),
            starving: BTreeSet::new(),
            counts: WebCounts::default(),
        }
    }

    fn bulk(&self, client: u32) -> bool {
        client < self.cfg.bulk_clients
    }

    /// When client `client`'s application first starts something (before `end`).
    pub fn first_start(&mut self, client: u32, end: u64) -> Option<u64> {
        self.end = end;
        if self.apps.len() <= client as usize {
            self.apps.resize_with(client as usize + 1, App::default);
        }
        let t = if self.bulk(client) {
            (self.rng.random::<f64>() * self.cfg.bulk_pause_s * 1e9) as u64
        } else if self.cfg.page_loads_per_s > 0.0 {
            exp_ns(&mut self.rng, self.cfg.page_loads_per_s)
        } else {
            return None;
        };
        (t < end).then_some(t)
    }

    /// True when every page started in the window has completed or failed.
    pub fn resolved(&self) -> bool {
        self.unresolved == 0
    }

    /// The application starts a page load (or download) at `t`; the next page load's time.
    pub fn start(
        &mut self,
        client: u32,
        session: &mut ClientSession,
        rng: &mut ChaCha20Rng,
        t: u64,
        end: u64,
        in_window: bool,
    ) -> Option<u64> {
        let bulk = self.bulk(client);
        let next = if bulk || self.cfg.page_loads_per_s <= 0.0 {
            None
        } else {
            Some(t + exp_ns(&mut self.rng, self.cfg.page_loads_per_s)).filter(|&n| n < end)
        };
        let Some(app) = self.apps.get_mut(client as usize) else {
            return next;
        };
        if app.open.len() >= self.cfg.max_open_per_client as usize {
            self.counts.skipped_busy += 1;
            return next;
        }
        if self.pages.len() >= MAX_PAGES {
            self.counts.skipped_full += 1;
            return next;
        }
        let index = self.pages.len() as u32;
        let target = Target::Host(format!("p{index}.sim"), 80);
        let Ok(id) = session.open_stream(target, None, rng) else {
            self.counts.open_refused += 1;
            if bulk {
                app.next_start = Some(t + (self.cfg.bulk_pause_s * 1e9) as u64);
            }
            return next;
        };
        let (kind, bytes) = if bulk {
            (PageKind::Bulk, u64::from(self.cfg.bulk_bytes))
        } else {
            (PageKind::Page, u64::from(self.cfg.page_bytes))
        };
        self.pages.push(Page {
            client,
            kind,
            bytes,
            started: t,
            in_window,
            sent: None,
            at_exit: None,
            first_byte: None,
            done: None,
            failed: None,
            received: 0,
        });
        self.unresolved += u64::from(in_window);
        app.open.insert(id, (index, Request::Waiting));
        next
    }

    /// A download client's next start, if its last download just ended.
    pub fn take_next_start(&mut self, client: u32) -> Option<u64> {
        let next = self.apps.get_mut(client as usize)?.next_start.take()?;
        (next < self.end).then_some(next)
    }

    fn resolve(&mut self, page: u32, t: u64, failed: Option<u8>) {
        let done = failed.is_none().then_some(t);
        let Some(p) = self.pages.get_mut(page as usize) else {
            return;
        };
        if p.resolved() {
            return;
        }
        p.done = done;
        p.failed = failed;
        self.unresolved -= u64::from(p.in_window);
        let client = p.client;
        if p.kind == PageKind::Bulk
            && let Some(app) = self.apps.get_mut(client as usize)
        {
            app.next_start = Some(t + (self.cfg.bulk_pause_s * 1e9) as u64);
        }
    }

    /// The session's events reach the application, which writes its requests; true if it
    /// wrote or closed anything (the session then has more to send).
    pub fn app_events(&mut self, client: u32, session: &mut ClientSession, t: u64) -> bool {
        while let Some(event) = session.poll_event() {
            let id = event.stream();
            let Some(&(page, _)) = self.apps.get(client as usize).and_then(|a| a.open.get(&id))
            else {
                continue;
            };
            let failed = match event {
                Event::Opened(_) => {
                    // The proxy answers CONNECT; the application sends its request.
                    let request = Request::Left(self.cfg.request_bytes as usize);
                    if let Some(entry) = self
                        .apps
                        .get_mut(client as usize)
                        .and_then(|a| a.open.get_mut(&id))
                    {
                        entry.1 = request;
                    }
                    None
                }
                Event::Writable(_) => None,
                Event::Data(_, bytes) => {
                    session.consumed(id, bytes.len());
                    if let Some(p) = self.pages.get_mut(page as usize) {
                        p.received += bytes.len() as u64;
                        p.first_byte.get_or_insert(t);
                    }
                    None
                }
                Event::Eof(_) => {
                    self.resolve(page, t, None);
                    if let Some(app) = self.apps.get_mut(client as usize) {
                        app.open.remove(&id);
                    }
                    None
                }
                Event::Refused(_, code) | Event::Reset(_, code) => Some(code.max(1)),
                Event::Failed(_, why) => Some(why.socks_code().max(1)),
            };
            if let Some(code) = failed {
                self.resolve(page, t, Some(code));
                if let Some(app) = self.apps.get_mut(client as usize) {
                    app.open.remove(&id);
                }
            }
        }
        let Some(app) = self.apps.get_mut(client as usize) else {
            return false;
        };
        let mut wrote = false;
        for (&id, (_, request)) in app.open.iter_mut() {
            let Request::Left(left) = *request else {
                continue;
            };
            let n = session.write(id, &vec![b'r'; left]);
            wrote |= n > 0;
            *request = if n >= left {
                session.close_stream(id);
                wrote = true;
                Request::Sent
            } else {
                Request::Left(left - n)
            };
        }
        wrote
    }

    /// The server's side of an exit event at `t` (`at_exit`: the sender and send time of the
    /// packet the exit is handling). A page whose request is complete: its index and the
    /// server's delay, after which [`Web::served`] makes its bytes available.
    pub fn exit_event(
        &mut self,
        exit: &mut ExitSession,
        event: ExitEvent,
        t: u64,
        at_exit: Option<(u32, u64)>,
    ) -> Option<(u32, u64)> {
        let now = Instant::from_nanos(t);
        match event {
            ExitEvent::Connect { key, target } => {
                let page = match &target {
                    Target::Host(host, _) => host
                        .strip_prefix('p')
                        .and_then(|h| h.strip_suffix(".sim"))
                        .and_then(|h| h.parse::<u32>().ok()),
                    Target::Addr(_) => None,
                };
                let Some(p) = page.and_then(|i| self.pages.get_mut(i as usize)) else {
                    self.counts.server_errors += 1;
                    let _ = exit.connect_failed(key, Refusal::HostUnreachable);
                    return None;
                };
                p.at_exit = Some(t);
                p.sent = at_exit.map(|(_, sent)| sent);
                let to_send = p.bytes;
                let index = page.unwrap_or_default();
                self.conns.insert(
                    key,
                    Conn {
                        page: index,
                        request_seen: 0,
                        scheduled: false,
                        ready: false,
                        to_send,
                        grant: None,
                        closed_sent: false,
                    },
                );
                self.by_page.insert(index, key);
                if exit.connected(now, key).is_err() {
                    self.counts.server_errors += 1;
                }
                None
            }
            ExitEvent::Write { key, bytes } => {
                let request = u64::from(self.cfg.request_bytes);
                let delay = (self.cfg.server_delay_ms * 1e6) as u64;
                let conn = self.conns.get_mut(&key)?;
                conn.request_seen += bytes.len() as u64;
                if exit.written(now, key, bytes.len()).is_err() {
                    self.counts.server_errors += 1;
                }
                if conn.request_seen >= request && !conn.scheduled {
                    conn.scheduled = true;
                    return Some((conn.page, delay));
                }
                None
            }
            ExitEvent::CloseWrite { .. } => None,
            ExitEvent::Read { key, max } => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.grant = Some(max.min(MAX_READ));
                }
                None
            }
            ExitEvent::Close { key } => {
                if let Some(conn) = self.conns.remove(&key) {
                    self.by_page.remove(&conn.page);
                }
                None
            }
        }
    }

    /// The server has page `page`'s answer ready.
    pub fn served(&mut self, page: u32) {
        if let Some(conn) = self.by_page.get(&page).and_then(|k| self.conns.get_mut(k)) {
            conn.ready = true;
        }
    }

    /// The server sends what it has where the exit granted a read.
    pub fn serve_reads(&mut self, exit: &mut ExitSession, t: u64) {
        let now = Instant::from_nanos(t);
        for (key, conn) in self.conns.iter_mut() {
            if !conn.ready {
                continue;
            }
            let Some(max) = conn.grant else { continue };
            if conn.to_send > 0 {
                let n = (max as u64).min(conn.to_send) as usize;
                if self.zeros.len() < n {
                    self.zeros.resize(n, 0);
                }
                conn.grant = None;
                conn.to_send -= n as u64;
                if exit
                    .received_from_target(now, *key, &self.zeros[..n])
                    .is_err()
                {
                    self.counts.server_errors += 1;
                }
            } else if !conn.closed_sent {
                conn.grant = None;
                conn.closed_sent = true;
                if exit.target_closed(now, *key).is_err() {
                    self.counts.server_errors += 1;
                }
            }
        }
    }

    /// Counts the exit sessions that just ran out of reply blocks with reply data waiting.
    pub fn watch_stock(&mut self, exit: &ExitSession, _t: u64, in_window: bool) {
        for key in self.conns.keys() {
            let waiting = exit
                .stream_usage(*key)
                .is_some_and(|u| u.unsent_reply_bytes);
            let empty = exit.session_surbs_held(key.session) == 0;
            if waiting && empty {
                if self.starving.insert(key.session) && in_window {
                    self.counts.starvation_events += 1;
                }
            } else if !empty {
                self.starving.remove(&key.session);
            }
        }
    }

    /// Samples the exit's reply-block stock: in all, and per session with a stream open.
    pub fn sample_stock(&mut self, exit: &ExitSession) {
        self.counts.stock_samples += 1;
        self.counts.stock_sum += exit.surbs_held() as f64;
        let sessions: BTreeSet<u64> = self.conns.keys().map(|k| k.session).collect();
        for s in sessions {
            let held = exit.session_surbs_held(s);
            self.counts.session_stock_samples += 1;
            self.counts.session_stock_sum += held as f64;
            self.counts.session_stock_empty += u64::from(held == 0);
        }
    }

    pub fn stock_figures(&self) -> StockFigures {
        let c = &self.counts;
        let per = |sum: f64, n: u64| (n > 0).then(|| sum / n as f64);
        StockFigures {
            exit_mean: per(c.stock_sum, c.stock_samples),
            session_mean: per(c.session_stock_sum, c.session_stock_samples),
            session_empty_fraction: per(c.session_stock_empty as f64, c.session_stock_samples),
            starvation_events: c.starvation_events,
        }
    }

    /// One row per page load or download.
    pub fn take_rows(&mut self) -> Vec<PageRow> {
        let s = |ns: u64| ns as f64 / 1e9;
        std::mem::take(&mut self.pages)
            .into_iter()
            .enumerate()
            .map(|(i, p)| PageRow {
                page: i as u32,
                client: p.client,
                kind: p.kind,
                bytes: p.bytes,
                in_window: p.in_window,
                started_s: s(p.started),
                sent_s: p.sent.map(s),
                at_exit_s: p.at_exit.map(s),
                first_byte_s: p.first_byte.map(s),
                done_s: p.done.map(s),
                failed: p.failed,
                received: p.received,
            })
            .collect()
    }
}
