//! Provenance: for every change the server accepts, who delivered it (the authenticated
//! device and its officer), when the server received it, and whether its Automerge actor is
//! bound to that device. Also keeps each household's village catalog entry current. Runs on
//! the document actor's blocking thread, before the flush that makes the change durable, so
//! a stored change never lacks its row. Must not trust what a change says about itself
//! (device clocks and self-declared authors are not evidence).

use automerge::{Automerge, ReadDoc};

use super::{read, Accounts};
use crate::auth::{DeviceId, UserName};
use crate::hub::{AcceptedChanges, DerivedEdit};
use crate::ids::{DocumentId, Timestamp};
use crate::storage::{blocking, StorageError, Table};

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
}

fn provenance_key(doc: DocumentId, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(doc.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn record(
    accounts: &Accounts,
    event: &AcceptedChanges,
    doc: &Automerge,
) -> Result<Vec<DerivedEdit>, StorageError> {
    let store = &accounts.inner.store;
    let device = event.principal.device.clone();
    for hash in &event.hashes {
        let Some(change) = doc.get_change_by_hash(hash) else {
            continue;
        };
        let actor = change.actor_id().to_bytes().to_vec();
        let bound_to = match &device {
            Some(d) => store
                .table_insert_if_absent_blocking(Table::Actors, &actor, d.as_str().as_bytes())?
                .and_then(|b| DeviceId::new(&String::from_utf8_lossy(&b)).ok())
                .filter(|b| b != d),
            None => None,
        };
        if let Some(other) = &bound_to {
            tracing::warn!(doc = %event.doc, actor = %hex::encode(&actor), device = ?device, bound_to = %other,
                "a change's actor is bound to another device; accepted and flagged");
        }
        let seq = store.next_sequence_blocking()?;
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
        };
        store.table_write_blocking(
            Table::Provenance,
            vec![(
                provenance_key(event.doc, seq),
                Some(serde_json::to_vec(&row).expect("rows serialise")),
            )],
        )?;
        let mut feed = event.doc.as_bytes().to_vec();
        feed.extend_from_slice(&hash.0);
        store.table_write_blocking(
            Table::Changes,
            vec![(seq.to_be_bytes().to_vec(), Some(feed))],
        )?;
    }

    // The village catalog lists the household with its current label and update time.
    let catalog = {
        let dir = read(&accounts.inner.dir);
        dir.household(event.doc)
            .and_then(|h| dir.village(&h.station, &h.village))
            .map(|v| (v.catalog, v.station.to_string(), v.name.to_string()))
    };
    let Some((catalog, station, village)) = catalog else {
        return Ok(Vec::new());
    };
    let label = crate::records::read_household(doc)
        .map(|h| h.address_label)
        .unwrap_or_default();
    let household = event.doc;
    let at = event.received_at;
    Ok(vec![DerivedEdit {
        doc: catalog,
        edit: Box::new(move |d| {
            if d.get_heads().is_empty() {
                crate::records::create_catalog(d, &station, &village).map_err(|e| e.to_string())?;
            }
            crate::records::upsert_catalog_entry(d, household, &label, at)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
    }])
}

impl Accounts {
    /// Every provenance row of `doc`, in server order.
    pub async fn provenance(&self, doc: DocumentId) -> Result<Vec<ProvenanceRow>, StorageError> {
        let store = self.inner.store.clone();
        let rows =
            blocking(move || store.table_scan_blocking(Table::Provenance, doc.as_bytes())).await?;
        rows.into_iter()
            .map(|(_, v)| {
                serde_json::from_slice(&v)
                    .map_err(|e| StorageError::Corrupt(format!("provenance row: {e}")))
            })
            .collect()
    }
}
