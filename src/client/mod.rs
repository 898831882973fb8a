//! The device-side library: what an officer's phone (or an example client) links to.
//!
//! Owns a local store (the same content-addressed `storage::Store`, in the device's own
//! directory), offline edits of household documents under the device's stable Automerge
//! actor id, and [`Device::sync`]: one session over the automerge-repo protocol that pushes
//! local changes, pulls everyone else's, persists the sync state, and reports which
//! documents the server now holds. Must not depend on the server's internals: it speaks only
//! the wire protocol, like any third-party client.

mod session;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use automerge::{ActorId, Automerge, ChangeHash};

use crate::ids::{DocumentId, PeerId, StorageId};
use crate::records::{self, HouseholdView, NewHousehold};
use crate::storage::{Store, StoreConfig};
pub use session::{DocSyncOutcome, SyncReport};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Record(#[from] records::RecordError),
    #[error("automerge: {0}")]
    Automerge(Box<automerge::AutomergeError>),
    #[error("cannot connect to {url}: {reason}; check the server address and that the server is running")]
    Connect { url: String, reason: String },
    #[error("the connection failed: {0}")]
    Connection(String),
    #[error("the server refused the session: {0}")]
    Server(String),
    #[error("sync did not finish within {0:?}; the documents not yet settled are still pending and will sync next time")]
    Timeout(Duration),
    #[error("the server sent a malformed message: {0}")]
    Protocol(String),
    #[error("document {0} is not on this device")]
    UnknownDocument(DocumentId),
    /// The server answered 401 (or another refusal) with its JSON error.
    #[error("the server refused ({status}): {message}")]
    Refused { status: u16, message: String },
}

impl From<automerge::AutomergeError> for ClientError {
    fn from(e: automerge::AutomergeError) -> Self {
        ClientError::Automerge(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

const META_STORAGE_ID: &str = "device.storage_id";
const META_ACTOR: &str = "device.actor_id";
const META_TRACKED: &str = "device.tracked";
/// The device token from enrolment. A phone keeps it in its secure storage; this library
/// keeps it in the device's own data directory.
const META_TOKEN: &str = "device.token";
pub(crate) const META_SERVER_STORAGE_ID: &str = "device.server_storage_id";
pub(crate) fn held_key(doc: DocumentId) -> String {
    format!("device.held.{doc}")
}

/// A device: a local store plus the identity it syncs under.
pub struct Device {
    store: Store,
    storage_id: StorageId,
    actor: ActorId,
    /// Per-sync timeout (the whole session).
    pub sync_timeout: Duration,
}

impl Device {
    /// Opens (or creates) the device's local store in `dir`. Must run inside a tokio runtime.
    pub async fn open(dir: &Path) -> Result<Device> {
        let store = Store::open(
            dir,
            &StoreConfig {
                sled_cache_bytes: 8 * 1024 * 1024,
                ..StoreConfig::default()
            },
        )?;
        let s = store.clone();
        let (storage_id, actor) = tokio::task::spawn_blocking(move || -> Result<_> {
            let storage_id = match s.meta_get_blocking(META_STORAGE_ID)? {
                Some(v) => StorageId::new(String::from_utf8_lossy(&v).into_owned()),
                None => None,
            }
            .unwrap_or_else(|| {
                let id = StorageId::random();
                let _ = s.meta_put_blocking(META_STORAGE_ID, id.as_str().as_bytes());
                id
            });
            let actor = match s.meta_get_blocking(META_ACTOR)? {
                Some(v) => ActorId::from(v),
                None => {
                    let a = ActorId::random();
                    s.meta_put_blocking(META_ACTOR, a.to_bytes())?;
                    a
                }
            };
            Ok((storage_id, actor))
        })
        .await
        .map_err(|e| ClientError::Connection(e.to_string()))??;
        store.flush().await?;
        Ok(Device {
            store,
            storage_id,
            actor,
            sync_timeout: Duration::from_secs(60),
        })
    }

    pub fn storage_id(&self) -> &StorageId {
        &self.storage_id
    }

    /// The device's Automerge actor id (stable across restarts).
    pub fn actor_id(&self) -> &ActorId {
        &self.actor
    }

    /// Creates a household offline and returns its id.
    pub async fn create_household(&self, new: &NewHousehold) -> Result<DocumentId> {
        let id = DocumentId::random();
        let new = new.clone();
        self.edit_inner(id, true, move |doc| {
            doc.transact(|tx| records::create_household(tx, &new))
                .map_err(|f| f.error)?;
            Ok(())
        })
        .await?;
        Ok(id)
    }

    /// Makes one change to a local document with the typed record API, e.g.
    /// `device.change(id, |tx| records::add_visit(tx, &visit)).await`. Durable on the device
    /// when it returns.
    pub async fn change<T: Send + 'static>(
        &self,
        doc: DocumentId,
        f: impl FnOnce(
                &mut automerge::transaction::Transaction<'_>,
            ) -> std::result::Result<T, records::RecordError>
            + Send
            + 'static,
    ) -> Result<T> {
        self.edit(doc, |d| {
            Ok(d.transact(f).map_err(|failure| failure.error)?.result)
        })
        .await
    }

    /// Applies `f` to a local document as one or more Automerge changes by this device, and
    /// makes the result durable on the device.
    pub async fn edit<T: Send + 'static>(
        &self,
        doc: DocumentId,
        f: impl FnOnce(&mut Automerge) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.edit_inner(doc, false, f).await
    }

    async fn edit_inner<T: Send + 'static>(
        &self,
        id: DocumentId,
        create: bool,
        f: impl FnOnce(&mut Automerge) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        let actor = self.actor.clone();
        let out = tokio::task::spawn_blocking(move || -> Result<T> {
            let mut doc = load_doc(&store, id)?;
            if !create && doc.get_heads().is_empty() {
                return Err(ClientError::UnknownDocument(id));
            }
            doc.set_actor(actor);
            let before = doc.get_heads();
            let out = f(&mut doc)?;
            if doc.get_heads() != before {
                store.put_incremental_blocking(id, &doc.save_after(&before))?;
            }
            Ok(out)
        })
        .await
        .map_err(|e| ClientError::Connection(e.to_string()))??;
        self.store.flush().await?;
        Ok(out)
    }

    /// Reads a local document.
    pub async fn read<T: Send + 'static>(
        &self,
        id: DocumentId,
        f: impl FnOnce(&Automerge) -> T + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || -> Result<T> { Ok(f(&load_doc(&store, id)?)) })
            .await
            .map_err(|e| ClientError::Connection(e.to_string()))?
    }

    pub async fn household(&self, id: DocumentId) -> Result<HouseholdView> {
        let view = self.read(id, records::read_household).await?;
        Ok(view?)
    }

    /// A village catalog as this device has it (sync it first: it is tracked at enrolment).
    pub async fn catalog(&self, id: DocumentId) -> Result<records::CatalogView> {
        let view = self.read(id, records::read_catalog).await?;
        Ok(view?)
    }

    pub async fn heads(&self, id: DocumentId) -> Result<Vec<ChangeHash>> {
        self.read(id, |d| d.get_heads()).await
    }

    /// Asks for a document by id or URL at the next sync (e.g. one another officer created).
    pub async fn track(&self, id: DocumentId) -> Result<()> {
        let mut tracked = self.tracked().await?;
        if tracked.insert(id) {
            let text = tracked
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n");
            self.meta_put(META_TRACKED, text.into_bytes()).await?;
        }
        Ok(())
    }

    async fn tracked(&self) -> Result<BTreeSet<DocumentId>> {
        Ok(self
            .meta_get(META_TRACKED)
            .await?
            .map(|v| {
                String::from_utf8_lossy(&v)
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Every document the device has or tracks.
    pub async fn documents(&self) -> Result<Vec<DocumentId>> {
        let mut all: BTreeSet<DocumentId> =
            self.store.list_documents().await?.into_iter().collect();
        all.extend(self.tracked().await?);
        Ok(all.into_iter().collect())
    }

    /// Documents with local changes the server is not yet known to hold. Empty means every
    /// local change is safe on the server.
    pub async fn unsynced(&self) -> Result<Vec<DocumentId>> {
        let mut out = Vec::new();
        for id in self.store.list_documents().await? {
            let heads = self.heads(id).await?;
            let held = self.meta_get(&held_key(id)).await?;
            if held.as_deref() != Some(encode_heads(&heads).as_slice()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Syncs every local and tracked document with the server at `url`
    /// (`ws://host:port/sync`), until each is settled or the timeout passes. The device's
    /// token (from [`Device::enroll`]) rides in `Authorization: Bearer`; a `token=` already in
    /// `url` is used as given.
    pub async fn sync(&self, url: &str) -> Result<SyncReport> {
        let docs = self.documents().await?;
        let token = if url.contains("token=") {
            None
        } else {
            self.token().await?
        };
        session::run(self, url, token.as_deref(), docs).await
    }

    /// Exchanges a one-time enrolment code for this device's token, at `server`
    /// (`http://host:port`), and keeps the token. Returns the server's answer (user, station,
    /// villages with their catalog URLs).
    pub async fn enroll(
        &self,
        server: &str,
        code: &str,
        device_name: &str,
    ) -> Result<serde_json::Value> {
        let url = format!("{}/api/v1/devices/enroll", server.trim_end_matches('/'));
        let body = serde_json::json!({"code": code, "device_name": device_name}).to_string();
        let timeout = self.sync_timeout;
        let answer = tokio::task::spawn_blocking(move || post_json(&url, &body, timeout))
            .await
            .map_err(|e| ClientError::Connection(e.to_string()))??;
        let token = answer["token"]
            .as_str()
            .ok_or_else(|| ClientError::Protocol("the enrolment answer has no token".into()))?;
        self.meta_put(META_TOKEN, token.as_bytes().to_vec()).await?;
        // The village catalogs come down at the next sync: that is how the device discovers
        // the households of its villages.
        for village in answer["villages"].as_array().into_iter().flatten() {
            if let Some(id) = village["catalog_url"]
                .as_str()
                .and_then(|u| DocumentId::parse_url_or_id(u).ok())
            {
                self.track(id).await?;
            }
        }
        Ok(answer)
    }

    /// The stored device token, if enrolled.
    pub async fn token(&self) -> Result<Option<String>> {
        Ok(self
            .meta_get(META_TOKEN)
            .await?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Uses `token` from now on (a device enrolled elsewhere, or tests).
    pub async fn set_token(&self, token: &str) -> Result<()> {
        self.meta_put(META_TOKEN, token.as_bytes().to_vec()).await
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn peer_id(&self) -> PeerId {
        // A fresh peer id per session (as automerge-repo does); the storage id is what makes
        // the device recognisable across sessions.
        PeerId::random("device")
    }

    async fn meta_get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let store = self.store.clone();
        let name = name.to_string();
        Ok(
            tokio::task::spawn_blocking(move || store.meta_get_blocking(&name))
                .await
                .map_err(|e| ClientError::Connection(e.to_string()))??,
        )
    }

    async fn meta_put(&self, name: &str, value: Vec<u8>) -> Result<()> {
        let store = self.store.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || store.meta_put_blocking(&name, &value))
            .await
            .map_err(|e| ClientError::Connection(e.to_string()))??;
        self.store.flush().await?;
        Ok(())
    }
}

/// POSTs a JSON body and returns the JSON answer; a non-2xx answer becomes
/// [`ClientError::Refused`] with the server's error message.
/// POSTs a JSON body and returns the JSON answer; a non-2xx answer becomes
/// [`ClientError::Refused`] with the server's error message. Plain HTTP (TLS comes from a
/// proxy in front of the server).
pub fn post_json(url: &str, body: &str, timeout: Duration) -> Result<serde_json::Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    let mut resp = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .map_err(|e| ClientError::Connect {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| ClientError::Connection(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    if !(200..300).contains(&status) {
        return Err(ClientError::Refused {
            status,
            message: error_message(&json, &text),
        });
    }
    Ok(json)
}

/// The `message` of the server's JSON error, or the raw text.
pub(crate) fn error_message(json: &serde_json::Value, raw: &str) -> String {
    json["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| raw.chars().take(200).collect())
}

pub(crate) fn load_doc(store: &Store, id: DocumentId) -> Result<Automerge> {
    let stored = store.load_blocking(id)?;
    let mut doc = Automerge::new();
    for (_, bytes) in &stored.chunks {
        doc.load_incremental(bytes)?;
    }
    Ok(doc)
}

pub(crate) fn encode_heads(heads: &[ChangeHash]) -> Vec<u8> {
    let mut sorted = heads.to_vec();
    sorted.sort();
    sorted.iter().flat_map(|h| h.0).collect()
}
