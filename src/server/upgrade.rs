//! The WebSocket handshake of `GET /sync` (RFC 6455 §4.2), and the socket's buffers and
//! framing. It is done here rather than by warp's `ws()` filter so that a connection's
//! buffers are sized for a server with hundreds of phones: warp 0.4 leaves tungstenite's
//! 128 KiB read buffer per connection (zero-filled, so resident, before every read) and a
//! write buffer that keeps the size of the largest message ever sent. Here the read buffer
//! is [`READ_BUFFER_BYTES`], and a message larger than [`FRAGMENT_BYTES`] is written as a
//! fragmented message (RFC 6455 §5.4), so the write buffer never holds more than one
//! fragment. Owns only the handshake and the socket's configuration: authentication, limits
//! and the protocol are the caller's.

use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use warp::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use warp::Filter;

/// An upgraded `/sync` connection.
pub(super) type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// What a connection reads the socket with. A frame larger than this is read in several
/// reads into a buffer grown to the frame (up to the message limit).
pub(super) const READ_BUFFER_BYTES: usize = 16 * 1024;

/// The largest frame the server writes: a longer message goes as a binary frame and
/// continuation frames of this size, which every WebSocket client reassembles.
pub(super) const FRAGMENT_BYTES: usize = 16 * 1024;

/// A request to upgrade to a WebSocket, with what the response needs.
pub(super) struct Upgrade {
    accept: String,
    on_upgrade: OnUpgrade,
}

/// Extracts the upgrade from a WebSocket handshake request: `None` when the request is not
/// one (no `Connection: upgrade`, `Upgrade: websocket`, version 13 and key, or no
/// connection to upgrade).
pub(super) fn upgrade() -> warp::filters::BoxedFilter<(Option<Upgrade>,)> {
    warp::header::headers_cloned()
        .and(warp::ext::optional::<OnUpgrade>())
        .map(|headers: HeaderMap, on_upgrade: Option<OnUpgrade>| {
            let accept = accept_key(&headers)?;
            Some(Upgrade {
                accept,
                on_upgrade: on_upgrade?,
            })
        })
        .boxed()
}

/// The `Sec-WebSocket-Accept` value for a valid handshake's headers.
fn accept_key(headers: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return None;
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION)? != "13" {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    Some(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

impl Upgrade {
    /// The `101 Switching Protocols` response; once it is sent, `run` gets the socket
    /// (spawned: the HTTP exchange ends with the response).
    pub(super) fn into_response<F, U>(self, max_message_bytes: usize, run: F) -> Response<Bytes>
    where
        F: FnOnce(Socket) -> U + Send + 'static,
        U: std::future::Future<Output = ()> + Send + 'static,
    {
        let config = config(max_message_bytes);
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let socket = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    run(socket).await;
                }
                Err(e) => tracing::debug!(error = %e, "the WebSocket upgrade did not complete"),
            }
        });
        let mut res = Response::new(Bytes::new());
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = res.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&self.accept).expect("base64 is a valid header value"),
        );
        res
    }
}

/// A `/sync` socket's configuration: the limit applies to a whole message, however many
/// frames it came in.
fn config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(FRAGMENT_BYTES)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// Queues `data` as one binary message on `sink`, in frames of at most [`FRAGMENT_BYTES`],
/// without flushing.
pub(super) async fn feed_binary<S>(sink: &mut S, data: Vec<u8>) -> Result<(), tungstenite::Error>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    if data.len() <= FRAGMENT_BYTES {
        return sink.feed(Message::Binary(data.into())).await;
    }
    let data = Bytes::from(data);
    let mut start = 0;
    while start < data.len() {
        let end = (start + FRAGMENT_BYTES).min(data.len());
        let opcode = if start == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(data.slice(start..end), opcode, end == data.len());
        sink.feed(Message::Frame(frame)).await?;
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_accept_key_is_the_rfcs_example_and_needs_every_header() {
        let good = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        // RFC 6455 §1.3's worked example.
        assert_eq!(
            accept_key(&headers(&good)).as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        for missing in 0..good.len() {
            let partial: Vec<_> = good
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != missing)
                .map(|(_, p)| *p)
                .collect();
            assert_eq!(
                accept_key(&headers(&partial)),
                None,
                "without {:?}",
                good[missing]
            );
        }
        let mut old = good;
        old[2] = ("sec-websocket-version", "8");
        assert_eq!(accept_key(&headers(&old)), None);
        let mut not_ws = good;
        not_ws[1] = ("upgrade", "h2c");
        assert_eq!(accept_key(&headers(&not_ws)), None);
    }

    #[tokio::test]
    async fn a_long_message_is_written_as_fragments_and_read_back_whole() {
        let long: Vec<u8> = (0..FRAGMENT_BYTES * 2 + 5).map(|i| i as u8).collect();
        let short = vec![7u8; 10];

        // The frames written: three for the long message (binary, then continuations, the
        // last one final), none longer than a fragment; one for the short.
        let mut written: Vec<Message> = Vec::new();
        let mut sink = (&mut written).sink_map_err(|e| match e {});
        feed_binary(&mut sink, long.clone()).await.unwrap();
        feed_binary(&mut sink, short.clone()).await.unwrap();
        let shape: Vec<(OpCode, bool, usize)> = written
            .iter()
            .map(|m| match m {
                Message::Frame(f) => (f.header().opcode, f.header().is_final, f.payload().len()),
                Message::Binary(b) => (OpCode::Data(Data::Binary), true, b.len()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (OpCode::Data(Data::Binary), false, FRAGMENT_BYTES),
                (OpCode::Data(Data::Continue), false, FRAGMENT_BYTES),
                (OpCode::Data(Data::Continue), true, 5),
                (OpCode::Data(Data::Binary), true, 10),
            ]
        );

        // A client reads them back as the two messages.
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut server = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        feed_binary(&mut server, long.clone()).await.unwrap();
        feed_binary(&mut server, short.clone()).await.unwrap();
        server.flush().await.unwrap();
        use futures_util::StreamExt;
        for want in [long, short] {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(got) => assert_eq!(got.as_ref(), want.as_slice()),
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    }

    /// A client's fragmented message is read whole, and the message limit applies to the
    /// whole message, not to each frame.
    #[tokio::test]
    async fn a_clients_fragmented_message_is_read_whole_and_limited_whole() {
        use futures_util::StreamExt;
        let message: Vec<u8> = (0..FRAGMENT_BYTES * 3).map(|i| (i % 251) as u8).collect();
        for (limit, whole) in [(1 << 20, true), (FRAGMENT_BYTES * 2, false)] {
            let (client, server) = tokio::io::duplex(1 << 20);
            let mut server =
                WebSocketStream::from_raw_socket(server, Role::Server, Some(config(limit))).await;
            let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            feed_binary(&mut client, message.clone()).await.unwrap();
            client.flush().await.unwrap();
            match server.next().await.unwrap() {
                Ok(Message::Binary(got)) if whole => assert_eq!(got.as_ref(), message.as_slice()),
                Err(tungstenite::Error::Capacity(_)) if !whole => {}
                other => panic!("limit {limit}: unexpected {other:?}"),
            }
        }
    }
}
