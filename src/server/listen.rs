//! The accept loop of the HTTP/WebSocket front: every TCP connection passes here before warp
//! sees a byte of it.
//!
//! Owns the bounds a caller without credentials can reach: a cap on open connections,
//! WebSockets included (when it is reached, the oldest connection that has not sent a whole
//! request yet is closed to make room, and failing that the new one is; the process keeps
//! descriptors for its store, its admin socket and the connections it serves), a deadline
//! for each request's header (a client that sends half a header is dropped instead of
//! holding a descriptor forever), and the client address that filters see (the socket's peer, or the address a
//! configured trusted proxy forwarded). Must not: route requests, authenticate, or touch the
//! hub (WebSocket sessions bound their own handshake, see `protocol::Session`).
//!
//! warp's own `Server` cannot take these settings (its acceptor trait is private), so this
//! serves warp's filter as a hyper service, as warp itself does.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use warp::filters::BoxedFilter;
use warp::Filter;

/// The bounds on connections, validated by `config`.
#[derive(Clone, Debug)]
pub struct ListenConfig {
    /// Open TCP connections (HTTP requests and WebSockets together). The rest are closed on
    /// accept. Keep it well under the process's descriptor limit (`serve` checks).
    pub max_connections: usize,
    /// Time a client has to send a request's whole header (also the longest a kept-alive
    /// connection may sit idle between requests).
    pub header_read_timeout: Duration,
    /// Proxies whose `X-Forwarded-For` is believed. Empty: the socket's peer is the client.
    pub trusted_proxies: Vec<IpAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            trusted_proxies: Vec::new(),
        }
    }
}

/// The socket peer of a request, put into its extensions by [`serve`].
#[derive(Clone, Copy, Debug)]
struct PeerAddr(SocketAddr);

/// The client a request comes from: the socket's peer, or, when that peer is a trusted
/// proxy, the last address in `X-Forwarded-For` that is not itself a trusted proxy.
pub(super) fn client(trusted: Arc<Vec<IpAddr>>) -> BoxedFilter<(Option<IpAddr>,)> {
    warp::ext::optional::<PeerAddr>()
        .and(warp::header::optional::<String>("x-forwarded-for"))
        .map(move |peer: Option<PeerAddr>, forwarded: Option<String>| {
            let peer = peer.map(|p| p.0.ip())?;
            Some(client_ip(peer, forwarded.as_deref(), &trusted))
        })
        .boxed()
}

/// The socket peer of the request (for logs).
pub(super) fn peer() -> BoxedFilter<(Option<SocketAddr>,)> {
    warp::ext::optional::<PeerAddr>()
        .map(|p: Option<PeerAddr>| p.map(|p| p.0))
        .boxed()
}

fn client_ip(peer: IpAddr, forwarded: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let Some(list) = forwarded else {
        return peer;
    };
    // Each proxy appends the address it heard from: walk from the right past our proxies.
    for hop in list.rsplit(',').take(16) {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => continue,
            Ok(ip) => return ip,
            Err(_) => return peer, // garbage: believe only what we saw
        }
    }
    peer
}

/// A connection's slot under the cap. The accept loop holds it for a plain HTTP connection;
/// `/sync` takes it out of the request (see [`take_slot`]) and keeps it for the WebSocket's
/// lifetime, so upgraded connections count too.
#[derive(Clone)]
struct Slot(Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>);

/// The connection's slot, for `/sync` to take once the upgrade happens ([`ConnSlot::take`]).
/// `None` outside the accept loop.
pub(super) fn slot() -> BoxedFilter<(Option<ConnSlot>,)> {
    warp::ext::optional::<Slot>()
        .map(|slot: Option<Slot>| slot.map(ConnSlot))
        .boxed()
}

/// A handle on a connection's place under the cap.
pub(super) struct ConnSlot(Slot);

impl ConnSlot {
    /// Takes the place, to be held by whatever outlives the HTTP exchange (an upgraded
    /// WebSocket); the connection's task no longer releases it.
    pub(super) fn take(self) -> Option<SlotGuard> {
        lock(&self.0 .0)
            .take()
            .map(|permit| SlotGuard { _permit: permit })
    }
}

/// Holds a connection's place under the cap until dropped.
pub(super) struct SlotGuard {
    _permit: OwnedSemaphorePermit,
}

/// Connections that have not sent a whole request yet, oldest first: when every slot is
/// taken, the oldest of them makes room for a new connection. A client that sends its request
/// at once (every real one) cannot be crowded out by connections that trickle or send
/// nothing.
#[derive(Default)]
struct Waiting {
    queue: std::sync::Mutex<VecDeque<(u64, CancellationToken)>>,
}

impl Waiting {
    fn push(&self, id: u64, cancel: CancellationToken) {
        lock(&self.queue).push_back((id, cancel));
    }

    fn served(&self, id: u64) {
        lock(&self.queue).retain(|(i, _)| *i != id);
    }

    /// Closes the oldest connection still waiting for its request; `false` if there is none.
    fn evict_oldest(&self) -> bool {
        match lock(&self.queue).pop_front() {
            Some((_, cancel)) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves `routes` on `listener` until `closing` is cancelled, then stops accepting and waits
/// (at most `grace`) for HTTP requests in flight. Upgraded WebSockets are not waited for here:
/// `server::run` closes and drains them.
pub(super) async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Box<dyn warp::Reply>,)>,
    config: ListenConfig,
    closing: CancellationToken,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let waiting = Arc::new(Waiting::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut refused: u64 = 0;
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = closing.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and the like: the connections we hold must close first. Wait a
                // little instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed; pausing accepts for 100 ms");
                tokio::select! {
                    _ = closing.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            // Full: make room by closing the oldest connection that has not sent a request.
            Err(_) if waiting.evict_oldest() => {
                tokio::time::timeout(Duration::from_millis(200), permits.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            refused += 1;
            // Logged for the first and then every 1000th, so a flood cannot flood the log.
            if refused % 1000 == 1 {
                tracing::warn!(
                    limit = config.max_connections,
                    refused,
                    "connection limit reached; closing new connections (raise --max-connections if this is real load)"
                );
            }
            drop(stream);
            continue;
        };
        next_id += 1;
        let id = next_id;
        let cancel = CancellationToken::new();
        waiting.push(id, cancel.clone());
        let _ = stream.set_nodelay(true);
        let slot = Slot(Arc::new(std::sync::Mutex::new(Some(permit))));
        let svc = warp::service(routes.clone());
        let request_slot = slot.clone();
        let seen = waiting.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                seen.served(id);
                req.extensions_mut().insert(PeerAddr(addr));
                req.extensions_mut().insert(request_slot.clone());
                let mut svc = svc.clone();
                svc.call(req)
            });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        let done = waiting.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = cancel.cancelled() => {
                    tracing::debug!("closed a connection that sent no request, to make room");
                }
            }
            done.served(id);
            // The slot is released here unless an upgraded WebSocket took it.
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP requests did not finish in time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_addresses_count_only_from_a_trusted_proxy() {
        let proxy = ip("10.0.0.2");
        let trusted = vec![proxy];
        // A client that is not our proxy cannot claim another address.
        assert_eq!(
            client_ip(ip("203.0.113.9"), Some("198.51.100.1"), &trusted),
            ip("203.0.113.9")
        );
        // Through the proxy: the address it appended, not what the client prepended.
        assert_eq!(
            client_ip(proxy, Some("198.51.100.1, 203.0.113.9"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_ip(proxy, None, &trusted), proxy);
        assert_eq!(client_ip(proxy, Some("not an ip"), &trusted), proxy);
        // Nobody trusted: the header is ignored.
        assert_eq!(client_ip(proxy, Some("198.51.100.1"), &[]), proxy);
    }
}
