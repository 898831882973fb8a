//! The household record on Automerge: the schema's vocabulary and validation (`schema`),
//! typed writes (`write`: households, members, visits, matters, follow-ups, reviews), typed
//! reads that keep concurrent values (`read`), the per-household summary the projection
//! stores (`summary`), the staff detail with conflicts, authors and history (`detail`), and
//! who wrote what (`attribution`), and merging one address registered twice (`merge`). `proto-docs/data-model.md` is the contract; this module is
//! its Rust face, used by the server, the device library and the examples.
//!
//! Rules it enforces: every nested container is created in the creating change (never
//! concurrently), entries live in maps keyed by UUID, and strings are read whether they were
//! written as Automerge text (the JS default) or as scalar strings. Must not do I/O.

mod attribution;
pub mod catalog;
mod detail;
pub mod merge;
mod read;
pub mod samples;
pub mod schema;
mod summary;
mod write;

pub use attribution::{Attribution, Author, Cited};
pub use catalog::{create_catalog, read_catalog, upsert_catalog_entry, CatalogEntry, CatalogView};
pub use detail::{
    conflicts, history, household_detail, Conflict, ConflictValue, Entry, HistoryEntry,
    HouseholdDetail, MergedEntry, Review,
};
pub use read::{
    address_key, address_label, household_scope, meeting_marks, normalise_address, read_household,
    HouseholdView, VisitView,
};
pub use schema::{
    is_entry_key, validate, FollowUpStatus, MatterKind, MatterStatus, Premises, ReviewState, Risk,
    VisitMode, VisitOutcome,
};
pub use summary::{summarise, FollowUpBrief, HouseholdSummary, MatterBrief, VisitRow};
pub use write::{
    add_follow_up, add_matter, add_member, add_visit, create_household, edit_visit,
    mark_for_meeting, set_address_field, set_member_field, set_premises, set_review,
    update_follow_up, update_matter, Address, FollowUpUpdate, NewFollowUp, NewHousehold, NewMatter,
    NewMember, NewVisit, VisitEdit,
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
    #[error("the household has no {map} entry `{id}`")]
    NoSuchEntry { map: &'static str, id: String },
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
