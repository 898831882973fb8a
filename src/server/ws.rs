//! `GET /sync`: authenticates (a 401 with a JSON error before any upgrade), upgrades to a
//! WebSocket and pumps frames between the socket, the connection's protocol `Session` and the
//! hub. One task per connection; it keeps reading (so pings and closes are seen) while
//! writing what the hub queues in its bounded outbox. A revoked device's connection is
//! closed through its kill switch (registered with `accounts`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use warp::Filter;

use super::errors::ApiError;
use super::upgrade::{self, Socket, Upgrade};
use super::Services;
use crate::accounts::{Authenticated, LiveGuard};
use crate::auth::Principal;
use crate::hub::{KillSwitch, Outbound, Outbox, OutboxRx, PeerLink};
use crate::ids::{ConnId, Timestamp};
use crate::protocol::{codec, CloseCode, Effect, Session};

pub(super) fn route(
    services: Services,
    sockets: TaskTracker,
    closing: CancellationToken,
) -> warp::filters::BoxedFilter<(Box<dyn warp::Reply>,)> {
    let caller = super::auth::caller(&services);
    warp::get()
        .and(warp::path("sync"))
        .and(warp::path::end())
        .and(caller)
        .and(upgrade::upgrade())
        .and(super::listen::peer())
        .and(super::listen::slot())
        .map(move |who: Result<Authenticated, ApiError>, ws: Option<Upgrade>, remote: Option<std::net::SocketAddr>, slot: Option<super::listen::ConnSlot>| {
            let principal = match who {
                Ok(who) => who.principal().clone(),
                Err(e) => {
                    tracing::info!(remote = ?remote, status = e.status().as_u16(), "sync refused before upgrade");
                    return Box::new(e) as Box<dyn warp::Reply>;
                }
            };
            let Some(ws) = ws else {
                return Box::new(ApiError::bad_request(
                    "/sync expects a WebSocket upgrade (automerge-repo protocol)",
                )) as Box<dyn warp::Reply>;
            };
            let services = services.clone();
            let sockets = sockets.clone();
            let closing = closing.clone();
            // tungstenite enforces the limit while reading, before a huge frame is buffered;
            // the session enforces the same limit on what gets through.
            let limit = services.config.max_message_bytes;
            let reply = ws
                .into_response(limit, move |socket| {
                    let slot = slot.and_then(super::listen::ConnSlot::take);
                    let conn = ConnId::next();
                    let span = tracing::info_span!(
                        "ws",
                        conn = %conn,
                        remote = ?remote,
                        user = %principal.user,
                        device = ?principal.device.as_ref().map(|d| d.to_string()),
                        peer = tracing::field::Empty
                    );
                    let task = sockets.spawn(
                        async move {
                            // The connection's place under the cap, for as long as it lives.
                            let _slot = slot;
                            Connection::new(services, conn, closing, principal)
                                .pump(socket)
                                .await
                        }
                        .instrument(span),
                    );
                    async move {
                        let _ = task.await;
                    }
                });
            Box::new(reply) as Box<dyn warp::Reply>
        })
        .boxed()
}

/// How long a closing connection waits for the peer's side of the close handshake.
const LINGER: Duration = Duration::from_secs(2);

struct Connection {
    services: Services,
    conn: ConnId,
    closing: CancellationToken,
    kill: Arc<KillSwitch>,
    outbox: Outbox,
    outbox_rx: OutboxRx,
    link: Option<PeerLink>,
    principal: Principal,
    /// Keeps the connection in the accounts' live registry while it runs.
    live: Option<LiveGuard>,
}

/// Why the pump stopped.
enum Stop {
    Continue,
    Done,
}

impl Connection {
    fn new(
        services: Services,
        conn: ConnId,
        closing: CancellationToken,
        principal: Principal,
    ) -> Self {
        let (outbox, outbox_rx) = Outbox::new(
            services.config.outbox_len,
            services.config.outbox_bytes,
            services.outbound.clone(),
        );
        let kill = Arc::new(KillSwitch::default());
        let live = services
            .accounts
            .register_connection(conn, principal.clone(), kill.clone());
        if live.is_none() {
            // Revoked between the token check and the upgrade.
            kill.kill(
                CloseCode::PolicyViolation,
                "the device or account is no longer valid",
            );
        }
        Self {
            services,
            conn,
            closing,
            kill,
            outbox,
            outbox_rx,
            link: None,
            principal,
            live,
        }
    }

    async fn pump(mut self, socket: Socket) {
        let (mut sink, mut stream) = socket.split();
        let mut session = Session::new(self.services.session.clone(), Timestamp::now());
        let mut ticker = tokio::time::interval(self.services.config.ping_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        let kill = self.kill.clone();
        let write_timeout = self.services.config.write_timeout;
        let outbox_len = self.services.config.outbox_len;
        let pause_bytes = self.services.config.pause_reading_bytes;
        tracing::debug!("connected");
        let mut paused = false;
        // Since when reading is paused: that time does not count as the peer's silence.
        let mut deaf_since: Option<Timestamp> = None;
        // The weight of the message taken from the outbox and being written.
        let mut writing = 0;
        loop {
            let in_flight = self.link.as_ref().map_or(0, PeerLink::requests_in_flight);
            let room = self.outbox.capacity();
            // Over the shared budget, every connection stops reading until it has room.
            let over_budget = self.outbox.budget().is_over();
            let now_paused = over_budget
                || !(room > outbox_len / 2
                    && in_flight < outbox_len / 2
                    && self.outbox.queued_bytes() < pause_bytes);
            if now_paused != paused {
                paused = now_paused;
                tracing::trace!(paused, in_flight, room, "reading paused or resumed");
                let now = Timestamp::now();
                match deaf_since.take() {
                    Some(since) => session.not_listening(since, now),
                    None => deaf_since = Some(now),
                }
            }
            let effects = tokio::select! {
                // In this order: a busy server that gets to this connection late reads the
                // frames already waiting (the peer's pongs among them) before its ping timer
                // can call the peer silent.
                biased;
                _ = self.closing.cancelled() => session.shutdown(),
                _ = until(session.join_deadline()) => session.tick(Timestamp::now()),
                (code, reason) = kill.killed() => session.fail(code, reason),
                // Backpressure: while half the outbox (or `pause_reading_bytes`) waits for
                // the socket, or half as many requests wait for their answers, the client's
                // frames are not read (they wait in TCP), so its own burst cannot overflow
                // its outbox.
                frame = stream.next(), if !paused => match frame {
                    Some(Ok(WsMessage::Binary(data))) => session.handle_binary(&data, Timestamp::now()),
                    Some(Ok(WsMessage::Text(_))) => session.handle_text(Timestamp::now()),
                    Some(Ok(WsMessage::Close(_))) => {
                        // Complete the close handshake: tungstenite queued our echo of the
                        // peer's close frame; send it before the socket drops.
                        let _ = tokio::time::timeout(write_timeout, sink.close()).await;
                        break;
                    }
                    Some(Ok(_)) => { session.heard_from_peer(Timestamp::now()); Vec::new() }
                    Some(Err(e)) if is_too_big(&e) => session.handle_oversized(),
                    Some(Err(e)) => { tracing::debug!(error = %e, "socket error"); break }
                    None => break,
                },
                // A settled request may let reading resume (re-checked at the loop's top).
                _ = settled(self.link.as_ref()) => Vec::new(),
                _ = self.outbox.budget().room(), if over_budget => Vec::new(),
                out = self.outbox_rx.recv() => {
                    // Counted until the socket has taken it (below), not just while queued.
                    writing = out.as_ref().map_or(0, Outbound::weight);
                    match out {
                        Some(Outbound::Message(m)) => vec![Effect::Send(m)],
                        Some(Outbound::Fail { code, message }) => session.fail(code, message),
                        None => Vec::new(),
                    }
                },
                _ = ticker.tick() => {
                    let now = Timestamp::now();
                    if let Some(since) = deaf_since.as_mut() {
                        session.not_listening(*since, now);
                        *since = now;
                    }
                    session.tick(now)
                }
            };
            let mut stop = Stop::Continue;
            // Handing a message to a busy document waits for room in its queue; the peer's
            // pongs wait meanwhile, through no fault of the peer.
            let busy_from = Timestamp::now();
            for effect in effects {
                match self.execute(effect, &mut sink, write_timeout).await {
                    Stop::Continue => {}
                    Stop::Done => {
                        stop = Stop::Done;
                        break;
                    }
                }
            }
            session.not_listening(busy_from, Timestamp::now());
            self.outbox.written_bytes(std::mem::take(&mut writing));
            if matches!(stop, Stop::Done) {
                // Linger briefly so the peer can read our error and close frame: dropping a
                // socket with unread input (the rest of an oversized frame) sends a TCP reset,
                // which can destroy those frames before the peer reads them.
                let _ = tokio::time::timeout(LINGER, async {
                    let _ = sink.close().await;
                    let mut errors = 0;
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(m) if m.is_close() => return, // the peer completed the close
                            Ok(_) => {}
                            Err(_) => {
                                errors += 1;
                                if errors > 64 {
                                    break;
                                }
                            }
                        }
                    }
                    // The stream ended without the peer's close (tungstenite stops reading
                    // after refusing an oversized frame): hold the socket until LINGER ends so
                    // the peer can still read what we sent.
                    std::future::pending::<()>().await;
                })
                .await;
                break;
            }
        }
        if self.link.is_some() {
            self.services.hub.disconnect(self.conn).await;
        }
        // What was queued and never written leaves the shared outbound budget (later sends
        // find the queue closed and give theirs back themselves).
        self.outbox_rx.close();
        while let Ok(out) = self.outbox_rx.try_recv() {
            self.outbox.written(&out);
        }
        self.live.take();
        tracing::debug!("disconnected");
    }

    async fn execute(
        &mut self,
        effect: Effect,
        sink: &mut futures_util::stream::SplitSink<Socket, WsMessage>,
        write_timeout: Duration,
    ) -> Stop {
        match effect {
            Effect::Send(message) => {
                let frame = codec::encode(&message);
                // Only the frame waits for the socket, not the message beside it.
                drop(message);
                let write = async {
                    upgrade::feed_binary(sink, frame).await?;
                    sink.flush().await
                };
                match tokio::time::timeout(write_timeout, write).await {
                    Ok(Ok(())) => Stop::Continue,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "write failed");
                        Stop::Done
                    }
                    Err(_) => {
                        tracing::warn!("write timed out; dropping peer");
                        Stop::Done
                    }
                }
            }
            Effect::Ping => {
                match tokio::time::timeout(
                    write_timeout,
                    sink.send(WsMessage::Ping(Default::default())),
                )
                .await
                {
                    Ok(Ok(())) => Stop::Continue,
                    _ => Stop::Done,
                }
            }
            Effect::Close { code, reason } => {
                if code != CloseCode::Normal && code != CloseCode::GoingAway {
                    tracing::info!(code = code.as_u16(), reason = %reason, "closing connection");
                } else {
                    // Phones leave and go out of coverage all day: not worth an info line.
                    tracing::debug!(code = code.as_u16(), reason = %reason, "closing connection");
                }
                let _ = tokio::time::timeout(
                    write_timeout,
                    sink.send(WsMessage::Close(Some(CloseFrame {
                        code: code.as_u16().into(),
                        reason: reason.into(),
                    }))),
                )
                .await;
                Stop::Done
            }
            Effect::Joined { peer_id, metadata } => {
                tracing::Span::current().record("peer", peer_id.as_str());
                let storage_id = if metadata.is_ephemeral {
                    None
                } else {
                    metadata.storage_id
                };
                self.link = Some(PeerLink::new(
                    self.conn,
                    peer_id,
                    storage_id,
                    self.principal.clone(),
                    self.outbox.clone(),
                    self.kill.clone(),
                ));
                Stop::Continue
            }
            Effect::Sync {
                kind,
                document_id,
                data,
            } => {
                tracing::trace!(doc = %document_id, ?kind, bytes = data.len(), "sync message read");
                if let Some(link) = &self.link {
                    let in_flight = link.request_started();
                    self.services
                        .hub
                        .sync(link, kind, document_id, data, in_flight)
                        .await;
                }
                Stop::Continue
            }
            Effect::Ephemeral(e) => {
                if let Some(link) = &self.link {
                    self.services.hub.ephemeral(link, e);
                }
                Stop::Continue
            }
        }
    }
}

/// Completes at `deadline` (wall clock, as the session keeps time); never if `None`.
async fn until(deadline: Option<Timestamp>) {
    match deadline {
        Some(d) => tokio::time::sleep(d.since(Timestamp::now())).await,
        None => std::future::pending().await,
    }
}

/// Whether a read failed because the peer sent more than `max_message_bytes`.
fn is_too_big(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Capacity(_))
}

/// Resolves when one of `link`'s requests settles; never without a link (before `join`).
async fn settled(link: Option<&PeerLink>) {
    match link {
        Some(l) => l.request_settled().await,
        None => std::future::pending().await,
    }
}
