//! CBOR encoding of protocol messages, the way automerge-repo's `cbor-x` writes them: one
//! map per frame, text keys, untagged byte strings.
//!
//! Decoding is lenient where real clients differ (integers that arrive as float64, a
//! `storageId` that is CBOR `undefined` or `null`, byte strings that arrive tagged, unknown
//! extra keys) and strict where it protects the server (frame size, nesting depth, trailing
//! bytes, field types). It owns no I/O.

use ciborium::value::{Integer, Value};

use super::message::*;
use crate::ids::{DocumentId, PeerId, StorageId};

/// Nesting deeper than this is refused before it can exhaust the stack.
const MAX_DEPTH: usize = 32;

/// CBOR items (map keys and values, array elements, strings, numbers) one frame may hold.
/// A real message has a few dozen (the Automerge data is one byte string); counted by a scan
/// of the item headers before anything is decoded or allocated, so a frame of millions of
/// one-byte items costs a bounded scan, not a tree of millions of values.
pub const MAX_ITEMS: usize = 4096;

/// Why a frame could not be decoded. The text is safe to send back to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("frame is not valid CBOR: {0}")]
    Cbor(String),
    #[error("frame has {0} bytes after the CBOR item")]
    TrailingBytes(usize),
    #[error("frame must be a CBOR map")]
    NotAMap,
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` must be {expected}")]
    Type {
        field: &'static str,
        expected: &'static str,
    },
    #[error("field `documentId` is not a document id: {0}")]
    DocumentId(String),
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    #[error("frame holds more than {0} CBOR items")]
    TooManyItems(usize),
}

/// Decodes one frame. `limit` is the largest frame accepted, in bytes.
pub fn decode(frame: &[u8], limit: usize) -> Result<Message, CodecError> {
    if frame.len() > limit {
        return Err(CodecError::TooLarge {
            size: frame.len(),
            limit,
        });
    }
    count_items(frame, MAX_ITEMS)?;
    let mut rest = frame;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_DEPTH)
        .map_err(|e| CodecError::Cbor(short_cbor_error(&e)))?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    let fields = Fields::new(value)?;
    from_fields(&fields)
}

/// Walks the CBOR item headers of `frame` (skipping string payloads) and refuses it if it
/// holds more than `max` items or nests deeper than [`MAX_DEPTH`]. Allocates nothing. Syntax
/// errors are left for the decoder to report.
fn count_items(frame: &[u8], max: usize) -> Result<(), CodecError> {
    // Items still to read at each open container level; u64::MAX marks an indefinite one.
    let mut pending: Vec<u64> = Vec::with_capacity(MAX_DEPTH);
    let mut pos = 0usize;
    let mut items = 0usize;
    let mut top_read = false;
    loop {
        // Close finished definite containers.
        while let Some(&0) = pending.last() {
            pending.pop();
        }
        if pending.is_empty() && top_read {
            return Ok(());
        }
        let Some(&initial) = frame.get(pos) else {
            return Ok(()); // truncated: the decoder says so
        };
        pos += 1;
        if initial == 0xff {
            // "break" ends the innermost indefinite container.
            match pending.last() {
                Some(&u64::MAX) => {
                    pending.pop();
                    continue;
                }
                _ => return Ok(()),
            }
        }
        items += 1;
        if items > max {
            return Err(CodecError::TooManyItems(max));
        }
        if let Some(last) = pending.last_mut() {
            if *last != u64::MAX {
                *last -= 1;
            }
        }
        top_read = true;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24..=27 => {
                let n = 1usize << (info - 24);
                let Some(bytes) = frame.get(pos..pos + n) else {
                    return Ok(());
                };
                pos += n;
                Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
            }
            31 => None, // indefinite length
            _ => return Ok(()),
        };
        match (major, arg) {
            // Integers, tags (the tagged item follows), simple values and floats.
            (0 | 1 | 6 | 7, _) => {}
            // Strings: skip the payload; an indefinite string is a series of chunks.
            (2 | 3, Some(len)) => {
                pos = pos.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
            }
            (2 | 3, None) | (4 | 5, None) => {
                if pending.len() >= MAX_DEPTH {
                    return Err(CodecError::Cbor("nested too deeply".into()));
                }
                pending.push(u64::MAX);
            }
            (4, Some(n)) | (5, Some(n)) => {
                if pending.len() >= MAX_DEPTH {
                    return Err(CodecError::Cbor("nested too deeply".into()));
                }
                let n = if major == 5 { n.saturating_mul(2) } else { n };
                if n > max as u64 {
                    return Err(CodecError::TooManyItems(max));
                }
                pending.push(n);
            }
            _ => {}
        }
        if major == 6 {
            // A tag's content is one more item at the same level: count it as pending.
            match pending.last_mut() {
                Some(last) if *last != u64::MAX => *last += 1,
                Some(_) => {}
                None => {
                    top_read = false;
                }
            }
        }
    }
}

fn short_cbor_error<E: std::fmt::Debug>(e: &ciborium::de::Error<E>) -> String {
    match e {
        ciborium::de::Error::Io(_) => "unexpected end of input".into(),
        ciborium::de::Error::Syntax(offset) => format!("syntax error at byte {offset}"),
        ciborium::de::Error::Semantic(offset, msg) => match offset {
            Some(o) => format!("{msg} at byte {o}"),
            None => msg.clone(),
        },
        ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".into(),
    }
}

/// Encodes one message as a CBOR map. A message's `data` (a sync message, possibly a whole
/// household) is copied once, straight into the output sized for it: not cloned into a CBOR
/// value first, nor into a buffer grown by doubling (with a few hundred phones waiting for
/// such messages, those copies were a third of the server's peak memory).
pub fn encode(message: &Message) -> Vec<u8> {
    let mut map: Vec<(Value, Value)> = Vec::with_capacity(8);
    let mut put = |k: &str, v: Value| map.push((Value::Text(k.to_string()), v));
    put("type", text(message.type_name()));
    put("senderId", text(message.sender_id().as_str()));
    match message {
        Message::Join(m) => {
            put("peerMetadata", metadata_value(&m.peer_metadata));
            put(
                "supportedProtocolVersions",
                Value::Array(m.supported_protocol_versions.iter().map(text).collect()),
            );
        }
        Message::Peer(m) => {
            put("targetId", text(m.target_id.as_str()));
            put("peerMetadata", metadata_value(&m.peer_metadata));
            put(
                "selectedProtocolVersion",
                text(&m.selected_protocol_version),
            );
        }
        Message::Leave { .. } => {}
        Message::Error(m) => {
            if let Some(t) = &m.target_id {
                put("targetId", text(t.as_str()));
            }
            put("message", text(&m.message));
        }
        Message::Request(m) | Message::Sync(m) => {
            put("targetId", text(m.target_id.as_str()));
            put("documentId", text(m.document_id.to_string()));
        }
        Message::DocUnavailable(m) => {
            put("targetId", text(m.target_id.as_str()));
            put("documentId", text(m.document_id.to_string()));
        }
        Message::Ephemeral(m) => {
            put("targetId", text(m.target_id.as_str()));
            put("documentId", text(m.document_id.to_string()));
            put("sessionId", text(&m.session_id));
            put("count", Value::Integer(Integer::from(m.count)));
        }
        Message::RemoteSubscriptionChange(m) => {
            put("targetId", text(m.target_id.as_str()));
            put(
                "add",
                Value::Array(m.add.iter().map(|s| text(s.as_str())).collect()),
            );
            put(
                "remove",
                Value::Array(m.remove.iter().map(|s| text(s.as_str())).collect()),
            );
        }
        Message::RemoteHeadsChanged(m) => {
            put("targetId", text(m.target_id.as_str()));
            put("documentId", text(m.document_id.to_string()));
            let heads = m
                .new_heads
                .iter()
                .map(|(storage, heads, ts)| {
                    (
                        text(storage.as_str()),
                        Value::Map(vec![
                            (
                                text("heads"),
                                Value::Array(heads.iter().map(text).collect()),
                            ),
                            (text("timestamp"), Value::Integer(Integer::from(*ts))),
                        ]),
                    )
                })
                .collect();
            put("newHeads", Value::Map(heads));
        }
    }
    // `data` goes last, appended below; the map's header then counts it too.
    let data: Option<&[u8]> = match message {
        Message::Request(m) | Message::Sync(m) => Some(&m.data),
        Message::Ephemeral(m) => Some(&m.data),
        _ => None,
    };
    let entries = map.len() + usize::from(data.is_some());
    let mut out = Vec::with_capacity(256 + data.map_or(0, <[u8]>::len));
    // Writing into a Vec cannot fail, and every Value built above is encodable.
    ciborium::ser::into_writer(&Value::Map(map), &mut out)
        .expect("encoding a CBOR value into memory cannot fail");
    if let Some(data) = data {
        // A map of fewer than 24 entries has a one-byte header (major type 5) holding the
        // count; these maps have at most eight.
        assert!(
            entries < 24 && out[0] & 0xe0 == 0xa0,
            "a short CBOR map header"
        );
        out[0] = 0xa0 | entries as u8;
        cbor_header(&mut out, 3, "data".len());
        out.extend_from_slice(b"data");
        cbor_header(&mut out, 2, data.len());
        out.extend_from_slice(data);
    }
    out
}

/// Appends a CBOR item header: `major` type (0–7) and its length argument (RFC 8949 §3).
fn cbor_header(out: &mut Vec<u8>, major: u8, len: usize) {
    let m = major << 5;
    let len = len as u64;
    match len {
        0..=23 => out.push(m | len as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, len as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

fn text(s: impl AsRef<str>) -> Value {
    Value::Text(s.as_ref().to_string())
}

fn metadata_value(m: &PeerMetadata) -> Value {
    let mut map = Vec::new();
    if let Some(s) = &m.storage_id {
        map.push((text("storageId"), text(s.as_str())));
    }
    map.push((text("isEphemeral"), Value::Bool(m.is_ephemeral)));
    Value::Map(map)
}

/// The text-keyed entries of one CBOR map.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn new(value: Value) -> Result<Self, CodecError> {
        let Value::Map(entries) = untag(value) else {
            return Err(CodecError::NotAMap);
        };
        Ok(Self(
            entries
                .into_iter()
                .filter_map(|(k, v)| match k {
                    Value::Text(k) => Some((k, v)),
                    _ => None,
                })
                .collect(),
        ))
    }

    /// The value of `key`; a CBOR `null`/`undefined` counts as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .filter(|v| !matches!(v, Value::Null))
    }

    fn text(&self, key: &'static str) -> Result<&str, CodecError> {
        match self.get(key).map(strip_tag) {
            Some(Value::Text(s)) => Ok(s),
            Some(_) => Err(CodecError::Type {
                field: key,
                expected: "a text string",
            }),
            None => Err(CodecError::Missing(key)),
        }
    }

    fn peer(&self, key: &'static str) -> Result<PeerId, CodecError> {
        PeerId::new(self.text(key)?).ok_or(CodecError::Type {
            field: key,
            expected: "a peer id of 1 to 256 bytes",
        })
    }

    fn document_id(&self) -> Result<DocumentId, CodecError> {
        let s = self.text("documentId")?;
        DocumentId::parse_url_or_id(s).map_err(|e| CodecError::DocumentId(e.to_string()))
    }

    fn bytes(&self, key: &'static str) -> Result<Vec<u8>, CodecError> {
        match self.get(key).map(strip_tag) {
            Some(Value::Bytes(b)) => Ok(b.clone()),
            Some(_) => Err(CodecError::Type {
                field: key,
                expected: "a byte string",
            }),
            None => Err(CodecError::Missing(key)),
        }
    }

    fn uint(&self, key: &'static str) -> Result<u64, CodecError> {
        let v = self.get(key).ok_or(CodecError::Missing(key))?;
        as_uint(v).ok_or(CodecError::Type {
            field: key,
            expected: "a non-negative integer",
        })
    }

    fn text_list(&self, key: &'static str) -> Result<Vec<String>, CodecError> {
        match self.get(key).map(strip_tag) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match strip_tag(v) {
                    Value::Text(s) => Ok(s.clone()),
                    _ => Err(CodecError::Type {
                        field: key,
                        expected: "an array of text strings",
                    }),
                })
                .collect(),
            Some(_) => Err(CodecError::Type {
                field: key,
                expected: "an array of text strings",
            }),
        }
    }

    fn metadata(&self) -> Result<PeerMetadata, CodecError> {
        let Some(v) = self.get("peerMetadata") else {
            return Ok(PeerMetadata::default());
        };
        let inner = Fields::new(v.clone()).map_err(|_| CodecError::Type {
            field: "peerMetadata",
            expected: "a map",
        })?;
        let storage_id = match inner.get("storageId").map(strip_tag) {
            None => None,
            Some(Value::Text(s)) => Some(StorageId::new(s.clone()).ok_or(CodecError::Type {
                field: "storageId",
                expected: "a storage id of 1 to 128 bytes",
            })?),
            Some(_) => {
                return Err(CodecError::Type {
                    field: "storageId",
                    expected: "a text string or undefined",
                })
            }
        };
        let is_ephemeral = match inner.get("isEphemeral").map(strip_tag) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(CodecError::Type {
                    field: "isEphemeral",
                    expected: "a boolean",
                })
            }
        };
        Ok(PeerMetadata {
            storage_id,
            is_ephemeral,
        })
    }
}

/// Strips any CBOR tags (some encoders tag byte strings as typed arrays).
fn untag(v: Value) -> Value {
    match v {
        Value::Tag(_, inner) => untag(*inner),
        other => other,
    }
}

fn strip_tag(v: &Value) -> &Value {
    match v {
        Value::Tag(_, inner) => strip_tag(inner),
        other => other,
    }
}

/// An unsigned integer, also when a JS encoder wrote a whole number as a float.
fn as_uint(v: &Value) -> Option<u64> {
    match strip_tag(v) {
        Value::Integer(i) => u64::try_from(*i).ok(),
        Value::Float(f) if f.fract() == 0.0 && *f >= 0.0 && *f <= 9_007_199_254_740_992.0 => {
            // Exact: a whole f64 within 2^53 converts to u64 without loss.
            Some(*f as u64)
        }
        _ => None,
    }
}

fn doc_message(f: &Fields, with_data: bool) -> Result<DocMessage, CodecError> {
    Ok(DocMessage {
        sender_id: f.peer("senderId")?,
        target_id: f.peer("targetId")?,
        document_id: f.document_id()?,
        data: if with_data {
            f.bytes("data")?
        } else {
            Vec::new()
        },
    })
}

fn from_fields(f: &Fields) -> Result<Message, CodecError> {
    let kind = f.text("type")?;
    Ok(match kind {
        "join" => Message::Join(Join {
            sender_id: f.peer("senderId")?,
            peer_metadata: f.metadata()?,
            supported_protocol_versions: f.text_list("supportedProtocolVersions")?,
        }),
        "peer" => Message::Peer(Peer {
            sender_id: f.peer("senderId")?,
            target_id: f.peer("targetId")?,
            peer_metadata: f.metadata()?,
            selected_protocol_version: f.text("selectedProtocolVersion")?.to_string(),
        }),
        "leave" => Message::Leave {
            sender_id: f.peer("senderId")?,
        },
        "error" => Message::Error(ErrorMessage {
            sender_id: f.peer("senderId")?,
            target_id: f.get("targetId").and_then(|_| f.peer("targetId").ok()),
            message: f.text("message")?.to_string(),
        }),
        "request" => Message::Request(doc_message(f, true)?),
        "sync" => Message::Sync(doc_message(f, true)?),
        "doc-unavailable" => Message::DocUnavailable(doc_message(f, false)?),
        "ephemeral" => Message::Ephemeral(Ephemeral {
            sender_id: f.peer("senderId")?,
            target_id: f.peer("targetId")?,
            document_id: f.document_id()?,
            session_id: f.text("sessionId")?.to_string(),
            count: f.uint("count")?,
            data: f.bytes("data")?,
        }),
        "remote-subscription-change" => {
            let ids = |key| -> Result<Vec<StorageId>, CodecError> {
                Ok(f.text_list(key)?
                    .into_iter()
                    .filter_map(StorageId::new)
                    .collect())
            };
            Message::RemoteSubscriptionChange(RemoteSubscriptionChange {
                sender_id: f.peer("senderId")?,
                target_id: f.peer("targetId")?,
                add: ids("add")?,
                remove: ids("remove")?,
            })
        }
        "remote-heads-changed" => {
            let mut new_heads = Vec::new();
            if let Some(v) = f.get("newHeads") {
                let entries = Fields::new(v.clone()).map_err(|_| CodecError::Type {
                    field: "newHeads",
                    expected: "a map",
                })?;
                for (storage, info) in &entries.0 {
                    let info = Fields::new(info.clone()).map_err(|_| CodecError::Type {
                        field: "newHeads",
                        expected: "a map of {heads, timestamp}",
                    })?;
                    let Some(storage) = StorageId::new(storage.clone()) else {
                        continue;
                    };
                    new_heads.push((
                        storage,
                        info.text_list("heads")?,
                        info.uint("timestamp").unwrap_or(0),
                    ));
                }
            }
            Message::RemoteHeadsChanged(RemoteHeadsChanged {
                sender_id: f.peer("senderId")?,
                target_id: f.peer("targetId")?,
                document_id: f.document_id()?,
                new_heads,
            })
        }
        other => return Err(CodecError::UnknownType(other.chars().take(64).collect())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> PeerId {
        PeerId::new(s).unwrap()
    }

    fn all_messages() -> Vec<Message> {
        let doc = DocumentId::random();
        let dm = DocMessage {
            sender_id: peer("a"),
            target_id: peer("b"),
            document_id: doc,
            data: vec![0x42, 1, 2, 3],
        };
        vec![
            Message::Join(Join {
                sender_id: peer("a"),
                peer_metadata: PeerMetadata {
                    storage_id: Some(StorageId::random()),
                    is_ephemeral: false,
                },
                supported_protocol_versions: vec!["1".into()],
            }),
            Message::Join(Join {
                sender_id: peer("a"),
                peer_metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true,
                },
                supported_protocol_versions: vec!["1".into(), "2".into()],
            }),
            Message::Peer(Peer {
                sender_id: peer("server"),
                target_id: peer("a"),
                peer_metadata: PeerMetadata {
                    storage_id: Some(StorageId::random()),
                    is_ephemeral: false,
                },
                selected_protocol_version: "1".into(),
            }),
            Message::Leave {
                sender_id: peer("a"),
            },
            Message::Error(ErrorMessage {
                sender_id: peer("server"),
                target_id: Some(peer("a")),
                message: "bad frame".into(),
            }),
            Message::Error(ErrorMessage {
                sender_id: peer("server"),
                target_id: None,
                message: "no join".into(),
            }),
            Message::Request(dm.clone()),
            Message::Sync(dm.clone()),
            Message::DocUnavailable(DocMessage {
                data: Vec::new(),
                ..dm.clone()
            }),
            Message::Ephemeral(Ephemeral {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc,
                session_id: "s1".into(),
                count: 7,
                data: vec![1, 2],
            }),
            Message::RemoteSubscriptionChange(RemoteSubscriptionChange {
                sender_id: peer("a"),
                target_id: peer("b"),
                add: vec![StorageId::random()],
                remove: vec![],
            }),
            Message::RemoteHeadsChanged(RemoteHeadsChanged {
                sender_id: peer("a"),
                target_id: peer("b"),
                document_id: doc,
                new_heads: vec![(StorageId::random(), vec!["abc".into()], 1_700_000_000_000)],
            }),
        ]
    }

    #[test]
    fn every_message_type_round_trips() {
        for m in all_messages() {
            let bytes = encode(&m);
            assert_eq!(decode(&bytes, 1 << 20).unwrap(), m, "{}", m.type_name());
        }
    }

    /// The data appended after the rest of the map is the CBOR a general encoder writes for
    /// the whole map, at every size of the byte string's length header.
    #[test]
    fn data_appended_to_the_map_is_the_same_cbor_as_a_value_map() {
        let doc = DocumentId::random();
        for len in [0, 23, 24, 255, 256, 65_535, 65_536, 300_000] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sync = Message::Sync(DocMessage {
                sender_id: peer("server"),
                target_id: peer("phone"),
                document_id: doc,
                data: data.clone(),
            });
            let expected = cbor(Value::Map(vec![
                (text("type"), text("sync")),
                (text("senderId"), text("server")),
                (text("targetId"), text("phone")),
                (text("documentId"), text(doc.to_string())),
                (text("data"), Value::Bytes(data.clone())),
            ]));
            let got = encode(&sync);
            assert!(got == expected, "sync message with {len} bytes of data");
            assert!(got.capacity() <= got.len() + 256, "sized once, not grown");
            let eph = Message::Ephemeral(Ephemeral {
                sender_id: peer("server"),
                target_id: peer("phone"),
                document_id: doc,
                session_id: "s".into(),
                count: 7,
                data: data.clone(),
            });
            let expected = cbor(Value::Map(vec![
                (text("type"), text("ephemeral")),
                (text("senderId"), text("server")),
                (text("targetId"), text("phone")),
                (text("documentId"), text(doc.to_string())),
                (text("sessionId"), text("s")),
                (text("count"), Value::Integer(7.into())),
                (text("data"), Value::Bytes(data)),
            ]));
            assert!(
                encode(&eph) == expected,
                "ephemeral message with {len} bytes"
            );
        }
    }

    fn cbor(v: Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(&v, &mut out).unwrap();
        out
    }

    #[test]
    fn integers_sent_as_float64_are_accepted() {
        let doc = DocumentId::random();
        let frame = cbor(Value::Map(vec![
            (text("type"), text("ephemeral")),
            (text("senderId"), text("a")),
            (text("targetId"), text("b")),
            (text("documentId"), text(doc.to_string())),
            (text("sessionId"), text("s")),
            (text("count"), Value::Float(3.0)),
            (text("data"), Value::Bytes(vec![1])),
        ]));
        let Message::Ephemeral(e) = decode(&frame, 1024).unwrap() else {
            panic!("not ephemeral")
        };
        assert_eq!(e.count, 3);
    }

    #[test]
    fn fractional_or_negative_counts_are_refused() {
        for bad in [Value::Float(1.5), Value::Float(-1.0), text("3")] {
            let frame = cbor(Value::Map(vec![
                (text("type"), text("ephemeral")),
                (text("senderId"), text("a")),
                (text("targetId"), text("b")),
                (text("documentId"), text(DocumentId::random().to_string())),
                (text("sessionId"), text("s")),
                (text("count"), bad),
                (text("data"), Value::Bytes(vec![1])),
            ]));
            assert!(matches!(
                decode(&frame, 1024),
                Err(CodecError::Type { field: "count", .. })
            ));
        }
    }

    #[test]
    fn tagged_byte_strings_are_accepted() {
        let frame = cbor(Value::Map(vec![
            (text("type"), text("sync")),
            (text("senderId"), text("a")),
            (text("targetId"), text("b")),
            (text("documentId"), text(DocumentId::random().to_string())),
            (
                text("data"),
                Value::Tag(64, Box::new(Value::Bytes(vec![0x42]))),
            ),
        ]));
        let Message::Sync(m) = decode(&frame, 1024).unwrap() else {
            panic!()
        };
        assert_eq!(m.data, vec![0x42]);
    }

    #[test]
    fn undefined_storage_id_means_none() {
        // map(4) type:"join" senderId:"a" peerMetadata:{storageId: undefined, isEphemeral: true}
        // supportedProtocolVersions:["1"], written by hand because ciborium never writes undefined.
        let mut frame = vec![0xa4];
        for (k, v) in [("type", "join"), ("senderId", "a")] {
            frame.extend(cbor(text(k)));
            frame.extend(cbor(text(v)));
        }
        frame.extend(cbor(text("peerMetadata")));
        frame.push(0xa2);
        frame.extend(cbor(text("storageId")));
        frame.push(0xf7); // undefined
        frame.extend(cbor(text("isEphemeral")));
        frame.push(0xf5); // true
        frame.extend(cbor(text("supportedProtocolVersions")));
        frame.extend(cbor(Value::Array(vec![text("1")])));
        let Message::Join(j) = decode(&frame, 1024).unwrap() else {
            panic!()
        };
        assert_eq!(j.peer_metadata.storage_id, None);
        assert!(j.peer_metadata.is_ephemeral);
    }

    #[test]
    fn malformed_frames_get_precise_errors() {
        assert!(matches!(
            decode(&[0xff, 0x00], 1024),
            Err(CodecError::Cbor(_))
        ));
        assert!(matches!(decode(&[0xa1], 1024), Err(CodecError::Cbor(_))));
        assert_eq!(decode(&cbor(text("hi")), 1024), Err(CodecError::NotAMap));
        let mut two = cbor(Value::Map(vec![]));
        two.push(0x00);
        assert_eq!(decode(&two, 1024), Err(CodecError::TrailingBytes(1)));
        assert_eq!(
            decode(&[0u8; 2000], 1024),
            Err(CodecError::TooLarge {
                size: 2000,
                limit: 1024
            })
        );
        let no_type = cbor(Value::Map(vec![(text("senderId"), text("a"))]));
        assert_eq!(decode(&no_type, 1024), Err(CodecError::Missing("type")));
        let bad_doc = cbor(Value::Map(vec![
            (text("type"), text("request")),
            (text("senderId"), text("a")),
            (text("targetId"), text("b")),
            (text("documentId"), text("not-an-id")),
            (text("data"), Value::Bytes(vec![1])),
        ]));
        assert!(matches!(
            decode(&bad_doc, 1024),
            Err(CodecError::DocumentId(_))
        ));
        let unknown = cbor(Value::Map(vec![
            (text("type"), text("teleport")),
            (text("senderId"), text("a")),
        ]));
        assert_eq!(
            decode(&unknown, 1024),
            Err(CodecError::UnknownType("teleport".into()))
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let mut frame = vec![0x81; 10_000];
        frame.push(0x00);
        assert!(matches!(decode(&frame, 1 << 20), Err(CodecError::Cbor(_))));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode(&bytes, 1 << 20);
            }

            #[test]
            fn document_messages_round_trip(
                sender in "[a-zA-Z0-9-]{1,64}",
                target in "[a-zA-Z0-9-]{1,64}",
                doc in any::<[u8; 16]>(),
                data in proptest::collection::vec(any::<u8>(), 0..512),
                request in any::<bool>(),
            ) {
                let m = DocMessage {
                    sender_id: peer(&sender),
                    target_id: peer(&target),
                    document_id: DocumentId::from_bytes(doc),
                    data,
                };
                let msg = if request { Message::Request(m) } else { Message::Sync(m) };
                prop_assert_eq!(decode(&encode(&msg), 1 << 20).unwrap(), msg);
            }

            #[test]
            fn a_valid_frame_with_one_byte_flipped_is_decoded_or_refused_not_a_panic(
                pos in any::<prop::sample::Index>(),
                bit in 0u8..8,
            ) {
                let mut frame = encode(&all_messages()[7]);
                let i = pos.index(frame.len());
                frame[i] ^= 1 << bit;
                let _ = decode(&frame, 1 << 20);
            }
        }
    }

    #[test]
    fn a_frame_of_millions_of_tiny_items_is_refused_before_decoding() {
        // A map whose `x` value is an array of 2,000,000 zeros: 2 MB of CBOR.
        let mut frame = vec![0xa2, 0x64];
        frame.extend_from_slice(b"type");
        frame.push(0x64);
        frame.extend_from_slice(b"sync");
        frame.extend_from_slice(&[0x61, b'x', 0x9a]);
        frame.extend_from_slice(&2_000_000u32.to_be_bytes());
        frame.resize(frame.len() + 2_000_000, 0);
        assert_eq!(
            decode(&frame, 16 << 20),
            Err(CodecError::TooManyItems(MAX_ITEMS))
        );
        // The same as an indefinite array (no length to check up front).
        let mut frame = vec![0x9f];
        frame.resize(MAX_ITEMS + 10, 0);
        frame.push(0xff);
        assert_eq!(
            decode(&frame, 16 << 20),
            Err(CodecError::TooManyItems(MAX_ITEMS))
        );
    }

    #[test]
    fn the_item_scan_accepts_every_real_message() {
        for m in all_messages() {
            let frame = encode(&m);
            assert_eq!(count_items(&frame, MAX_ITEMS), Ok(()), "{m:?}");
        }
        // Tags, indefinite strings and nesting within limits are fine.
        let v = Value::Map(vec![(
            Value::Text("k".into()),
            Value::Tag(64, Box::new(Value::Bytes(vec![1, 2, 3]))),
        )]);
        let mut frame = Vec::new();
        ciborium::ser::into_writer(&v, &mut frame).unwrap();
        // The map, its key, the tag and the tagged bytes.
        assert_eq!(count_items(&frame, 4), Ok(()));
        assert_eq!(count_items(&frame, 3), Err(CodecError::TooManyItems(3)));
    }
}
