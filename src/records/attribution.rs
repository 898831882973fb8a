//! Who wrote a value: maps an Automerge operation (the id of a value or object) to the change
//! that made it, and that change to its author as the server recorded it (account, device,
//! server receive time). The rows come from outside (the server's provenance table); this
//! file only indexes them, and remembers which changes were asked about (`cited`), so the
//! projection can keep those authors and re-project the next change without the household's
//! whole history. Must not do I/O, and must not take a change's own claims (actor names,
//! device clocks) as its author.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};

use automerge::{ActorId, Automerge, ChangeHash, ObjId};

/// The author of a change, as the server recorded it when the change arrived.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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

/// A change an attribution was asked about, and its author (`None`: the server recorded
/// none, e.g. its own catalog edits).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cited {
    pub change: ChangeHash,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<Author>,
}

/// Op id -> change -> author, for one document.
pub struct Attribution {
    /// Per actor: (start op, max op, hash) of each of its changes, by start op.
    by_actor: HashMap<ActorId, Vec<(u64, u64, ChangeHash)>>,
    /// Known authors; `None`: known to have none.
    authors: HashMap<ChangeHash, Option<Author>>,
    /// `authors` covers every change (a change it lacks has no author); otherwise a change it
    /// lacks is unknown, and asking about one is a miss.
    complete: bool,
    /// The changes asked about, in hash order.
    asked: RefCell<BTreeSet<ChangeHash>>,
    missed: Cell<bool>,
}

impl Attribution {
    /// From every author the server recorded for `doc`'s changes.
    pub fn new(doc: &Automerge, authors: HashMap<ChangeHash, Author>) -> Self {
        let authors = authors.into_iter().map(|(h, a)| (h, Some(a))).collect();
        Self::with(doc, authors, true)
    }

    /// From some of the authors (`None`: known to have none): asking about a change that
    /// `known` lacks answers `None` and is remembered as a miss ([`Attribution::missed`]).
    pub fn partial(doc: &Automerge, known: HashMap<ChangeHash, Option<Author>>) -> Self {
        Self::with(doc, known, false)
    }

    fn with(doc: &Automerge, authors: HashMap<ChangeHash, Option<Author>>, complete: bool) -> Self {
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
        Self {
            by_actor,
            authors,
            complete,
            asked: RefCell::new(BTreeSet::new()),
            missed: Cell::new(false),
        }
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
        self.author_of_change(&self.change_of(id)?)
    }

    pub fn author_of_change(&self, hash: &ChangeHash) -> Option<&Author> {
        self.asked.borrow_mut().insert(*hash);
        match self.authors.get(hash) {
            Some(author) => author.as_ref(),
            None => {
                if !self.complete {
                    self.missed.set(true);
                }
                None
            }
        }
    }

    /// A partial attribution was asked about a change it did not know: what was computed
    /// with it may be wrong (ask again with every author).
    pub fn missed(&self) -> bool {
        self.missed.get()
    }

    /// Every change asked about so far, with its author: what a [`Attribution::partial`]
    /// needs to answer the same questions again.
    pub fn cited(&self) -> Vec<Cited> {
        self.asked
            .borrow()
            .iter()
            .map(|h| Cited {
                change: *h,
                author: self.authors.get(h).cloned().flatten(),
            })
            .collect()
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
        let a = Attribution::new(&doc, authors.clone());
        let (_, id) = doc.get(ROOT, "phone").unwrap().unwrap();
        assert_eq!(a.change_of(&id), Some(second));
        assert_eq!(a.author_of(&id).unwrap().user, "ben");
        assert_eq!(a.author_of(&ROOT), None);
        assert!(!a.missed(), "a complete attribution knows every change");
        assert_eq!(
            a.cited(),
            vec![Cited {
                change: second,
                author: Some(authors[&second].clone()),
            }]
        );

        // What it cited answers the same question without the other changes' authors; a
        // question about another change is a miss, not a change without an author.
        let known = a
            .cited()
            .into_iter()
            .map(|c| (c.change, c.author))
            .collect();
        let again = Attribution::partial(&doc, known);
        assert_eq!(again.author_of(&id).unwrap().user, "ben");
        assert!(!again.missed());
        let (_, x) = doc.get(ROOT, "x").unwrap().unwrap();
        assert_eq!(again.author_of(&x).unwrap().user, "ben", "the same change");
        assert!(!again.missed());
        assert_eq!(again.author_of_change(&first), None);
        assert!(again.missed());
    }
}
