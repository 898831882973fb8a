//! Who wrote a value: maps an Automerge operation (the id of a value or object) to the change
//! that made it, and that change to its author as the server recorded it (account, device,
//! server receive time). The rows come from outside (the server's provenance table); this
//! file only indexes them. Must not do I/O, and must not take a change's own claims (actor
//! names, device clocks) as its author.

use std::collections::HashMap;

use automerge::{ActorId, Automerge, ChangeHash, ObjId};

/// The author of a change, as the server recorded it when the change arrived.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Author {
    /// The account that delivered the change (the officer, or the staff member the server
    /// made it for).
    pub user: String,
    /// The enrolled device that delivered it; `None` for changes the server made on behalf
    /// of a staff account.
    pub device: Option<String>,
    /// Server receive time, ms since the epoch.
    pub received_at_ms: i64,
}

/// Op id -> change -> author, for one document.
pub struct Attribution {
    /// Per actor: (start op, max op, hash) of each of its changes, by start op.
    by_actor: HashMap<ActorId, Vec<(u64, u64, ChangeHash)>>,
    authors: HashMap<ChangeHash, Author>,
}

impl Attribution {
    pub fn new(doc: &Automerge, authors: HashMap<ChangeHash, Author>) -> Self {
        let mut by_actor: HashMap<ActorId, Vec<(u64, u64, ChangeHash)>> = HashMap::new();
        for c in doc.get_changes_meta(&[]) {
            by_actor
                .entry(c.actor.into_owned())
                .or_default()
                .push((c.start_op, c.max_op, c.hash));
        }
        for v in by_actor.values_mut() {
            v.sort_unstable_by_key(|(start, _, _)| *start);
        }
        Self { by_actor, authors }
    }

    /// The change that made the value or object `id`.
    pub fn change_of(&self, id: &ObjId) -> Option<ChangeHash> {
        let ObjId::Id(counter, actor, _) = id else {
            return None;
        };
        let changes = self.by_actor.get(actor)?;
        let i = changes.partition_point(|(start, _, _)| *start <= *counter);
        let (start, max, hash) = changes.get(i.checked_sub(1)?)?;
        (*start <= *counter && *counter <= *max).then_some(*hash)
    }

    /// Who wrote the value or object `id`, if the server recorded its change.
    pub fn author_of(&self, id: &ObjId) -> Option<&Author> {
        self.authors.get(&self.change_of(id)?)
    }

    pub fn author_of_change(&self, hash: &ChangeHash) -> Option<&Author> {
        self.authors.get(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ReadDoc, ROOT};

    #[test]
    fn each_value_maps_to_the_change_and_author_that_wrote_it() {
        let mut doc = Automerge::new();
        doc.transact(|tx| tx.put(ROOT, "phone", "0911")).unwrap();
        let first = doc.get_heads()[0];
        let mut other = doc.fork();
        other
            .transact(|tx| {
                tx.put(ROOT, "x", 1)?;
                tx.put(ROOT, "phone", "0922")
            })
            .unwrap();
        let second = other.get_heads()[0];
        doc.merge(&mut other).unwrap();
        let authors = HashMap::from([
            (
                first,
                Author {
                    user: "amy".into(),
                    device: Some("dev-1".into()),
                    received_at_ms: 1,
                },
            ),
            (
                second,
                Author {
                    user: "ben".into(),
                    device: None,
                    received_at_ms: 2,
                },
            ),
        ]);
        let a = Attribution::new(&doc, authors);
        let (_, id) = doc.get(ROOT, "phone").unwrap().unwrap();
        assert_eq!(a.change_of(&id), Some(second));
        assert_eq!(a.author_of(&id).unwrap().user, "ben");
        assert_eq!(a.author_of(&ROOT), None);
    }
}
