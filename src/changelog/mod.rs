//! The change log: for every change the server accepts, who delivered it (the authenticated
//! device and its officer), when the server received it, and whether its Automerge actor is
//! bound to that device (provenance rows and actor bindings); the change feed in server
//! order; and each household's village catalog entry. It is one of the hub's observers and
//! runs on the document actor's blocking thread, before the flush that makes the change
//! durable, so a stored change never lacks its row. Must not: decide access or change the
//! account directory (it only reads it, through [`Accounts`]), or trust what a change says
//! about itself (device clocks and self-declared authors are not evidence).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use automerge::Automerge;

use crate::accounts::Accounts;
use crate::auth::{DeviceId, UserName};
use crate::hub::{AcceptedChanges, ChangeObserver, DerivedEdit};
use crate::ids::{DocumentId, Timestamp};
use crate::storage::{blocking, StorageError, Store};

pub mod postgres;
pub mod store;

pub use store::{ChangeLogStore, SledChangeLog};

/// One accepted change.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProvenanceRow {
    /// Server sequence number: increases with every accepted change, across documents.
    pub seq: u64,
    pub doc: DocumentId,
    /// The change hash (hex).
    pub hash: String,
    /// The Automerge actor that made the change (hex).
    pub actor: String,
    /// The authenticated device that delivered it.
    pub device: Option<DeviceId>,
    /// The account of that device.
    pub user: UserName,
    /// Server receive time.
    pub received_at: Timestamp,
    /// The actor was first delivered by another device (`actor_bound_to`): the change was
    /// accepted (a hash DAG cannot refuse one change), but it deserves a look.
    pub flagged: bool,
    pub actor_bound_to: Option<DeviceId>,
    /// The document's heads once the batch this change arrived in was applied (hex).
    #[serde(default)]
    pub heads_after: Vec<String>,
}

impl ProvenanceRow {
    /// The author as the record views name it.
    pub fn author(&self) -> crate::records::Author {
        author(&self.user, self.device.as_ref(), self.received_at)
    }
}

/// The author of the changes `user` delivered from `device` at `received_at`, as their
/// provenance rows name it.
pub fn author(
    user: &UserName,
    device: Option<&DeviceId>,
    received_at: Timestamp,
) -> crate::records::Author {
    crate::records::Author {
        user: user.to_string(),
        device: device.map(|d| d.to_string()),
        received_at_ms: received_at.as_millis() as i64,
    }
}

/// One entry of the change feed (`GET /api/v1/changes`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FeedEntry {
    pub seq: u64,
    pub document: DocumentId,
    /// The change (hex hash).
    pub change: String,
    /// The document's heads after the batch it arrived in.
    pub heads: Vec<String>,
    pub device: Option<DeviceId>,
    pub officer: UserName,
    pub received_at: Timestamp,
}

/// A page of the change feed; `next` is the `after` of the next page.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FeedPage {
    pub changes: Vec<FeedEntry>,
    pub next: u64,
}

/// The change log's service: cheap to clone.
#[derive(Clone)]
pub struct ChangeLog {
    inner: Arc<Inner>,
}

struct Inner {
    rows: Arc<dyn ChangeLogStore>,
    accounts: Accounts,
    /// The address label each household's catalog entry is known to carry (a hash of it),
    /// so a change that leaves the label alone costs the catalog nothing. Lost on restart:
    /// the first change after it re-checks the entry (a no-op edit when it is current).
    catalog_labels: Mutex<HashMap<DocumentId, u64>>,
}

impl ChangeLog {
    /// On the embedded sled store.
    pub fn new(store: Store, accounts: Accounts) -> Self {
        Self::with_store(Arc::new(SledChangeLog::new(store)), accounts)
    }

    /// On any backend of [`ChangeLogStore`].
    pub fn with_store(rows: Arc<dyn ChangeLogStore>, accounts: Accounts) -> Self {
        Self {
            inner: Arc::new(Inner {
                rows,
                accounts,
                catalog_labels: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl ChangeObserver for ChangeLog {
    fn changes_accepted(
        &self,
        event: &AcceptedChanges,
        doc: &Automerge,
    ) -> Result<Vec<DerivedEdit>, StorageError> {
        record(&self.inner, event, doc)
    }
}

fn record(
    log: &Arc<Inner>,
    event: &AcceptedChanges,
    doc: &Automerge,
) -> Result<Vec<DerivedEdit>, StorageError> {
    let store = &log.rows;
    let device = event.principal.device.clone();
    let heads_after: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
    for hash in &event.hashes {
        // The change's metadata, not the change: rebuilding a change walks the whole
        // document's operations, its metadata is a lookup in the change graph.
        let Some(change) = doc.get_change_meta_by_hash(hash) else {
            continue;
        };
        let actor = change.actor.to_bytes().to_vec();
        let bound_to = match &device {
            Some(d) => store.bind_actor(&actor, d)?.filter(|b| b != d),
            None => None,
        };
        if let Some(other) = &bound_to {
            tracing::warn!(doc = %event.doc, actor = %hex::encode(&actor), device = ?device, bound_to = %other,
                "a change's actor is bound to another device; accepted and flagged");
        }
        let seq = store.next_seq()?;
        let row = ProvenanceRow {
            seq,
            doc: event.doc,
            hash: hex::encode(hash.0),
            actor: hex::encode(&actor),
            device: device.clone(),
            user: event.principal.user.clone(),
            received_at: event.received_at,
            flagged: bound_to.is_some(),
            actor_bound_to: bound_to,
            heads_after: heads_after.clone(),
        };
        store.append(&row)?;
    }

    // The village catalog lists the household with its current label. It is written only
    // when the household is new to it or its label changed: every catalog change goes to
    // every device of the village, so a visit must not cost one.
    let catalog = log.accounts.with_directory(|dir| {
        dir.household(event.doc)
            .and_then(|h| dir.village(&h.station, &h.village))
            .map(|v| (v.catalog, v.station.to_string(), v.name.to_string()))
    });
    let Some((catalog, station, village)) = catalog else {
        return Ok(Vec::new());
    };
    // Only the address is read: the visits and their notes are not needed for a label.
    let label = crate::records::address_label(doc);
    // A merge mark reaches the catalog when the server writes it (a device's changes are
    // never a merge).
    let merged_into = if device.is_none() {
        crate::records::merge::merge_mark_written_in(doc, &event.hashes)
    } else {
        None
    };
    let label_hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&station, &village, &label, merged_into).hash(&mut h);
        h.finish()
    };
    let household = event.doc;
    if lock(&log.catalog_labels).get(&household) == Some(&label_hash) {
        return Ok(Vec::new());
    }
    let at = event.received_at;
    let log = log.clone();
    Ok(vec![DerivedEdit {
        doc: catalog,
        edit: Box::new(move |d| {
            if d.get_heads().is_empty() {
                crate::records::create_catalog(d, &station, &village).map_err(|e| e.to_string())?;
            }
            crate::records::upsert_catalog_entry(d, household, &label, merged_into, at)
                .map_err(|e| e.to_string())?;
            // Known only once the entry is in the catalog (durable with the catalog's flush).
            lock(&log.catalog_labels).insert(household, label_hash);
            Ok(())
        }),
    }])
}

/// Rows scanned per feed request at most (rows the caller may not see are skipped).
const FEED_SCAN_MAX_ROWS: usize = 10_000;

impl ChangeLog {
    /// Every provenance row of `doc`, in server order.
    pub async fn provenance(&self, doc: DocumentId) -> Result<Vec<ProvenanceRow>, StorageError> {
        let this = self.clone();
        blocking(move || this.provenance_blocking(doc)).await
    }

    pub fn provenance_blocking(&self, doc: DocumentId) -> Result<Vec<ProvenanceRow>, StorageError> {
        self.inner.rows.history(doc)
    }

    /// Up to `limit` accepted changes after `after` that `who` may read, in server order.
    pub async fn changes_after(
        &self,
        who: &crate::auth::Principal,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, StorageError> {
        let this = self.clone();
        let who = who.clone();
        blocking(move || {
            let accounts = &this.inner.accounts;
            let visible = |doc: DocumentId| {
                matches!(
                    accounts.with_directory(|d| d.access(&who, doc)),
                    crate::auth::Access::Read | crate::auth::Access::ReadWrite
                )
            };
            let (rows, next) = this
                .inner
                .rows
                .feed(after, limit, FEED_SCAN_MAX_ROWS, &visible)?;
            Ok(FeedPage {
                changes: rows
                    .into_iter()
                    .map(|row| FeedEntry {
                        seq: row.seq,
                        document: row.doc,
                        change: row.hash,
                        heads: row.heads_after,
                        device: row.device,
                        officer: row.user,
                        received_at: row.received_at,
                    })
                    .collect(),
                next,
            })
        })
        .await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::tests::{device, setup_with_log};
    use crate::auth::Principal;
    use automerge::transaction::Transactable;

    fn accepted(
        doc: &Automerge,
        id: DocumentId,
        who: &Principal,
        since: &[automerge::ChangeHash],
    ) -> AcceptedChanges {
        AcceptedChanges {
            doc: id,
            principal: who.clone(),
            hashes: doc.get_changes(since).iter().map(|c| c.hash()).collect(),
            received_at: Timestamp::from_millis(42),
        }
    }

    #[tokio::test]
    async fn an_actor_is_bound_to_its_first_device_and_reuse_elsewhere_is_flagged() {
        let (_dir, accounts, hub, log) = setup_with_log().await;
        let amy = device(&accounts, &hub, "amy").await;
        let ben = device(&accounts, &hub, "ben").await;
        let id = DocumentId::random();
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "n", 1).unwrap();
        tx.commit();
        let first = doc.get_heads();
        log.changes_accepted(&accepted(&doc, id, &amy, &[]), &doc)
            .unwrap();
        // The same actor (a restored backup on ben's phone) makes another change.
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "n", 2).unwrap();
        tx.commit();
        log.changes_accepted(&accepted(&doc, id, &ben, &first), &doc)
            .unwrap();
        let rows = log.provenance(id).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].device, amy.device);
        assert!(!rows[0].flagged);
        assert_eq!(rows[1].device, ben.device);
        assert!(rows[1].flagged, "{:?}", rows[1]);
        assert_eq!(rows[1].actor_bound_to, amy.device);
        assert_eq!(rows[1].received_at, Timestamp::from_millis(42));
        hub.shutdown().await;
    }
}
