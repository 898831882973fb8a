//! The village catalog document: how a device discovers the households of its villages.
//! One per village, written only by the server, read-only to devices:
//!
//! ```text
//! type: "catalog", schema: 1, station, village,
//! households: { <document id>: { url: "automerge:<id>", address_label, updated_at (ms),
//!                                 merged_into?: "automerge:<survivor id>" } }
//! ```
//!
//! `merged_into` is set when staff merged the household into another (the survivor): a
//! device shows the survivor instead, and records new visits there.
//!
//! `updated_at` is when the entry was written: the household's registration, or the last
//! change of its address label. Visits do not touch the catalog (every catalog change reaches
//! every device of the village).
//!
//! Owns the schema's writes and reads. Must not do I/O; the server decides when to write.

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::read::{map_at, string_at};
use super::{RecordError, SCHEMA_VERSION};
use crate::ids::{DocumentId, Timestamp};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CatalogEntry {
    pub id: DocumentId,
    pub url: String,
    pub address_label: String,
    pub updated_at_ms: i64,
    /// The survivor's URL, when staff merged this household into another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CatalogView {
    pub station: String,
    pub village: String,
    /// Sorted by address label, then id.
    pub households: Vec<CatalogEntry>,
}

/// Writes the catalog's skeleton (its first change). Every nested container is made here,
/// once, by the only writer.
pub fn create_catalog(
    doc: &mut Automerge,
    station: &str,
    village: &str,
) -> Result<(), RecordError> {
    let mut tx = doc.transaction();
    tx.put(ROOT, "type", "catalog")?;
    tx.put(ROOT, "schema", SCHEMA_VERSION)?;
    tx.put(ROOT, "station", station)?;
    tx.put(ROOT, "village", village)?;
    tx.put_object(ROOT, "households", ObjType::Map)?;
    tx.commit();
    Ok(())
}

/// Adds one household's entry, or relabels it, or (with `merged_into`) points it to the
/// survivor it was merged into; `updated_at` is written with it. Returns whether anything
/// changed: an entry that is current is left alone (no Automerge change at all, and its
/// `updated_at` stays). `None` leaves an entry's `merged_into` as it is.
pub fn upsert_catalog_entry(
    doc: &mut Automerge,
    household: DocumentId,
    address_label: &str,
    merged_into: Option<DocumentId>,
    updated_at: Timestamp,
) -> Result<bool, RecordError> {
    let households = map_at(doc, &ROOT, "households").ok_or_else(|| RecordError::Invalid {
        field: "households",
        reason: "the catalog has no households map".into(),
    })?;
    let key = household.to_string();
    let updated = i64::try_from(updated_at.as_millis()).unwrap_or(i64::MAX);
    let existing = map_at(doc, &households, &key);
    let merged_url = merged_into.map(|m| m.to_url());
    if let Some(entry) = &existing {
        if string_at(doc, entry, "address_label").as_deref() == Some(address_label)
            && (merged_url.is_none() || string_at(doc, entry, "merged_into") == merged_url)
        {
            return Ok(false);
        }
    }
    let mut tx = doc.transaction();
    let entry = match existing {
        Some(e) => e,
        None => {
            let e = tx.put_object(&households, key.as_str(), ObjType::Map)?;
            tx.put(&e, "url", household.to_url())?;
            e
        }
    };
    tx.put(&entry, "address_label", address_label)?;
    if let Some(url) = &merged_url {
        tx.put(&entry, "merged_into", url.as_str())?;
    }
    tx.put(&entry, "updated_at", ScalarValue::Timestamp(updated))?;
    tx.commit();
    Ok(true)
}

pub fn read_catalog<R: ReadDoc>(doc: &R) -> Result<CatalogView, RecordError> {
    if string_at(doc, &ROOT, "type").as_deref() != Some("catalog") {
        return Err(RecordError::NotAHousehold(
            "`type` is not \"catalog\"".into(),
        ));
    }
    let mut households = Vec::new();
    if let Some(map) = map_at(doc, &ROOT, "households") {
        for key in doc.keys(&map) {
            let (Ok(id), Some(entry)) = (key.parse::<DocumentId>(), map_at(doc, &map, &key)) else {
                continue;
            };
            let updated_at_ms = match doc.get(&entry, "updated_at").ok().flatten() {
                Some((Value::Scalar(s), _)) => match s.as_ref() {
                    ScalarValue::Timestamp(t) | ScalarValue::Int(t) => *t,
                    _ => 0,
                },
                _ => 0,
            };
            households.push(CatalogEntry {
                id,
                url: string_at(doc, &entry, "url").unwrap_or_else(|| id.to_url()),
                address_label: string_at(doc, &entry, "address_label").unwrap_or_default(),
                merged_into: string_at(doc, &entry, "merged_into"),
                updated_at_ms,
            });
        }
    }
    households.sort_by(|a, b| (&a.address_label, a.id).cmp(&(&b.address_label, b.id)));
    Ok(CatalogView {
        station: string_at(doc, &ROOT, "station").unwrap_or_default(),
        village: string_at(doc, &ROOT, "village").unwrap_or_default(),
        households,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_added_relabelled_and_not_rewritten_when_the_label_is_current() {
        let mut doc = Automerge::new();
        create_catalog(&mut doc, "north", "東村").unwrap();
        let h = DocumentId::random();
        let t = Timestamp::from_millis(1_000);
        assert!(upsert_catalog_entry(&mut doc, h, "East Rd No. 1", None, t).unwrap());
        let heads = doc.get_heads();
        assert!(!upsert_catalog_entry(&mut doc, h, "East Rd No. 1", None, t).unwrap());
        assert!(
            !upsert_catalog_entry(
                &mut doc,
                h,
                "East Rd No. 1",
                None,
                Timestamp::from_millis(2_000)
            )
            .unwrap(),
            "a later change with the same label is not a catalog change"
        );
        assert_eq!(doc.get_heads(), heads, "no empty changes");
        let view = read_catalog(&doc).unwrap();
        assert_eq!(view.households[0].updated_at_ms, 1_000);

        assert!(upsert_catalog_entry(
            &mut doc,
            h,
            "East Rd No. 1-1",
            None,
            Timestamp::from_millis(3_000)
        )
        .unwrap());
        let view = read_catalog(&doc).unwrap();
        assert_eq!(view.village, "東村");
        assert_eq!(view.households.len(), 1);
        assert_eq!(view.households[0].url, h.to_url());
        assert_eq!(view.households[0].address_label, "East Rd No. 1-1");
        assert_eq!(view.households[0].updated_at_ms, 3_000);
        assert_eq!(view.households[0].merged_into, None);

        // A merge points the entry to the survivor; later label checks keep the pointer.
        let survivor = DocumentId::random();
        let t = Timestamp::from_millis(4_000);
        assert!(upsert_catalog_entry(&mut doc, h, "East Rd No. 1-1", Some(survivor), t).unwrap());
        assert!(!upsert_catalog_entry(&mut doc, h, "East Rd No. 1-1", Some(survivor), t).unwrap());
        assert!(!upsert_catalog_entry(&mut doc, h, "East Rd No. 1-1", None, t).unwrap());
        let view = read_catalog(&doc).unwrap();
        assert_eq!(view.households[0].merged_into, Some(survivor.to_url()));
    }
}
