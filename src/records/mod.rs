//! The household record on Automerge: typed writes (create, visits, fields) and a typed read
//! that keeps concurrent values. `proto-docs/data-model.md` is the contract; this module is
//! its Rust face, used by the device library and the examples (issue 4 adds validation and
//! projections).
//!
//! Rules it enforces: every nested container is created in the creating change (never
//! concurrently), entries live in maps keyed by UUID, and strings are read whether they were
//! written as Automerge text (the JS default) or as scalar strings. Must not do I/O.

pub mod catalog;
mod read;
pub mod samples;
mod write;

pub use catalog::{create_catalog, read_catalog, upsert_catalog_entry, CatalogEntry, CatalogView};
pub use read::{household_scope, read_household, HouseholdView, VisitView};
pub use write::{
    add_visit, create_household, set_address_field, set_premises, Address, NewHousehold, NewVisit,
    Premises, VisitMode, VisitOutcome,
};

/// The schema version written into `schema`.
pub const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("automerge: {0}")]
    Automerge(Box<automerge::AutomergeError>),
    #[error("not a household document: {0}")]
    NotAHousehold(String),
    #[error("invalid value for `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl From<automerge::AutomergeError> for RecordError {
    fn from(e: automerge::AutomergeError) -> Self {
        RecordError::Automerge(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::{Automerge, ReadDoc};

    use samples::visit;

    fn household() -> NewHousehold {
        NewHousehold {
            address: Address {
                landmark: "next to the temple".into(),
                ..samples::household("12").address
            },
            ..samples::household("12")
        }
    }

    fn sync(a: &mut Automerge, b: &mut Automerge) {
        let (mut sa, mut sb) = (automerge::sync::State::new(), automerge::sync::State::new());
        loop {
            let m1 = a.generate_sync_message(&mut sa);
            if let Some(m) = m1.clone() {
                b.receive_sync_message(&mut sb, m).unwrap();
            }
            let m2 = b.generate_sync_message(&mut sb);
            if let Some(m) = m2.clone() {
                a.receive_sync_message(&mut sa, m).unwrap();
            }
            if m1.is_none() && m2.is_none() {
                break;
            }
        }
    }

    #[test]
    fn a_new_household_reads_back() {
        let mut doc = Automerge::new();
        doc.transact(|tx| create_household(tx, &household()))
            .unwrap();
        let view = read_household(&doc).unwrap();
        assert_eq!(view.village, "Linsen");
        assert_eq!(view.premises, vec!["home".to_string()]);
        assert_eq!(
            view.address_label,
            "Zhongzheng Linsen 3 Linsen S. Rd No. 12"
        );
        assert!(view.visits.is_empty());
    }

    #[test]
    fn concurrent_visits_and_field_edits_merge_without_loss() {
        let mut a = Automerge::new();
        a.transact(|tx| create_household(tx, &household())).unwrap();
        let mut b = a.fork();
        a.transact(|tx| add_visit(tx, &visit("officer-a", "dog barks at night")))
            .unwrap();
        a.transact(|tx| set_premises(tx, Premises::Rental)).unwrap();
        b.transact(|tx| add_visit(tx, &visit("officer-b", "asked about fraud calls")))
            .unwrap();
        b.transact(|tx| set_premises(tx, Premises::Shop)).unwrap();
        sync(&mut a, &mut b);
        assert_eq!(a.get_heads(), b.get_heads());
        let view = read_household(&a).unwrap();
        let mut notes: Vec<_> = view.visits.iter().map(|v| v.notes.clone()).collect();
        notes.sort();
        assert_eq!(notes, vec!["asked about fraud calls", "dog barks at night"]);
        let mut premises = view.premises.clone();
        premises.sort();
        assert_eq!(premises, vec!["rental", "shop"]);
    }

    #[test]
    fn strings_written_as_text_or_scalar_read_the_same() {
        let mut doc = Automerge::new();
        doc.transact(|tx| create_household(tx, &household()))
            .unwrap();
        // The JS library writes strings as Text objects by default.
        doc.transact(|tx| {
            use automerge::transaction::Transactable;
            let t = tx.put_object(automerge::ROOT, "village", automerge::ObjType::Text)?;
            tx.splice_text(&t, 0, 0, "Linsen")?;
            Ok::<_, automerge::AutomergeError>(())
        })
        .unwrap();
        assert_eq!(read_household(&doc).unwrap().village, "Linsen");
        assert!(doc.get(automerge::ROOT, "village").unwrap().is_some());
    }

    #[test]
    fn a_document_that_is_not_a_household_is_refused() {
        let doc = Automerge::new();
        assert!(matches!(
            read_household(&doc),
            Err(RecordError::NotAHousehold(_))
        ));
    }
}
