//! Merging two households that are one address registered twice (two officers offline):
//! what is read out of the retired household, how it is copied into the survivor, the
//! marks both carry, and how readers honour those marks.
//!
//! The rules (`proto-docs/data-model.md`, "Merged households"):
//! - Every member, visit, matter and follow-up of the retired household is copied into the
//!   survivor under its own key, with `merged_from` saying where it came from and who wrote
//!   it first (the author and server time the server recorded for the retired household).
//!   Review comments and meeting marks are copied too. An entry the survivor already has is
//!   left alone, so running a merge again copies only what arrived since.
//! - The retired household keeps everything and gets `merged_into` (the survivor, who, when,
//!   and the heads its copy was taken at): what changed after those heads arrived after the
//!   merge, and staff are told.
//! - Both marks are honoured only when the server wrote them (on behalf of a staff account):
//!   a device cannot retire a household or claim another officer's words by writing them.
//!
//! Must not do I/O: documents and authors come in, effects go out as transactions.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{Automerge, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::attribution::{Attribution, Author};
use super::read::{map_at, string_at};
use super::summary::{entries, int_at};
use super::RecordError;
use crate::ids::DocumentId;

/// The collections whose entries a merge copies.
pub const MERGED_COLLECTIONS: [&str; 4] = ["members", "visits", "matters", "follow_ups"];

/// The mark on a retired household, as the server wrote it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MergeMark {
    /// The survivor.
    pub into: DocumentId,
    /// The staff account that merged it.
    pub by: String,
    pub at_ms: i64,
    /// The retired household's heads when its copy was taken (hex).
    pub heads: Vec<String>,
}

/// Where a copied entry came from: the household it was first recorded in, and who wrote
/// it there as the server recorded it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    pub household: DocumentId,
    /// Who created the entry (absent when the server had no record of its change).
    pub author: Option<Author>,
    /// Fields someone set after the entry was created: who set them.
    pub set: BTreeMap<String, Author>,
}

/// A value read out of a document, to be written into another.
#[derive(Clone, Debug, PartialEq)]
enum Node {
    Scalar(ScalarValue),
    Text(String),
    Map(Vec<(String, Node)>),
    List(Vec<Node>),
}

/// One entry to copy.
#[derive(Clone, Debug, PartialEq)]
struct SourceEntry {
    collection: &'static str,
    key: String,
    fields: Vec<(String, Node)>,
    origin: Origin,
}

/// Everything a merge copies out of the retired household, read at `heads`.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeSource {
    pub retired: DocumentId,
    pub heads: Vec<ChangeHash>,
    /// An earlier merge of the same household, if there was one.
    pub previous: Option<MergeMark>,
    entries: Vec<SourceEntry>,
    /// Review comments (maps of by, at, text).
    comments: Vec<Vec<(String, Node)>>,
    /// Meeting marks by visit.
    meeting: Vec<(String, Vec<(String, Node)>)>,
    /// Paths that changed on the retired household after the earlier merge.
    changed_since_previous: Vec<String>,
}

/// What a merge copied.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MergeCopied {
    /// Entries copied, per collection.
    pub copied: BTreeMap<String, usize>,
    pub comments: usize,
    /// Entries the survivor had already (copied by an earlier merge).
    pub already_there: usize,
    /// Edits made on the retired household after an earlier merge to entries that merge
    /// copied: they are not copied again (the survivor's copy may have been edited since);
    /// they stay on the retired household, where staff can read them.
    pub left_on_retired: Vec<String>,
}

/// Whether the value or object `id` was written by the server on behalf of a staff account.
fn server_made(attribution: &Attribution, id: &ObjId) -> bool {
    attribution
        .author_of(id)
        .is_some_and(|a| a.device.is_none())
}

/// The household's merge mark, if the server wrote it.
pub fn merge_mark(doc: &Automerge, attribution: &Attribution) -> Option<MergeMark> {
    let mark = map_at(doc, &ROOT, "merged_into")?;
    if !server_made(attribution, &mark) {
        return None;
    }
    let written = |key: &str| match doc.get(&mark, key).ok().flatten() {
        Some((_, id)) => server_made(attribution, &id),
        None => false,
    };
    if !["into", "by", "at", "heads"].iter().all(|k| written(k)) {
        return None;
    }
    read_mark(doc, &mark)
}

fn read_mark(doc: &Automerge, mark: &ObjId) -> Option<MergeMark> {
    let into = string_at(doc, mark, "into")?;
    let into = into
        .strip_prefix("automerge:")
        .unwrap_or(&into)
        .parse()
        .ok()?;
    let heads = match doc.get(mark, "heads").ok().flatten() {
        Some((Value::Object(ObjType::List), list)) => (0..doc.length(&list))
            .filter_map(|i| match doc.get(&list, i).ok().flatten() {
                Some((Value::Scalar(s), _)) => match s.as_ref() {
                    ScalarValue::Str(h) => Some(h.to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(MergeMark {
        into,
        by: string_at(doc, mark, "by").unwrap_or_default(),
        at_ms: int_at(doc, mark, "at").unwrap_or_default(),
        heads,
    })
}

/// The survivor a merge mark written in one of `hashes` names: what the village catalog
/// learns when the server marks a household merged. `None` when none of these changes
/// wrote the mark (a device's changes never count: the caller passes only server-made
/// ones).
pub fn merge_mark_written_in(doc: &Automerge, hashes: &[ChangeHash]) -> Option<DocumentId> {
    let mark = map_at(doc, &ROOT, "merged_into")?;
    let (_, into_id) = doc.get(&mark, "into").ok().flatten()?;
    let made_here = |id: &ObjId| {
        let ObjId::Id(counter, actor, _) = id else {
            return false;
        };
        hashes.iter().any(|h| {
            doc.get_change_meta_by_hash(h).is_some_and(|m| {
                m.actor.as_ref() == actor && m.start_op <= *counter && *counter <= m.max_op
            })
        })
    };
    if !(made_here(&mark) && made_here(&into_id)) {
        return None;
    }
    read_mark(doc, &mark).map(|m| m.into)
}

/// What changed on a merged household after the heads its copy was taken at (dotted
/// paths, the mark itself left out): what arrived after the merge.
pub fn changed_after_merge(doc: &Automerge, mark: &MergeMark) -> Vec<String> {
    let heads: Vec<ChangeHash> = mark.heads.iter().filter_map(|h| h.parse().ok()).collect();
    if heads.len() != mark.heads.len()
        || heads
            .iter()
            .any(|h| doc.get_change_meta_by_hash(h).is_none())
    {
        return Vec::new();
    }
    super::detail::touched(doc, &heads, &doc.get_heads())
        .into_iter()
        .filter(|p| p != "merged_into" && !p.starts_with("merged_into."))
        .collect()
}

/// Where the entry `obj` came from, if it is a copy the server made in a merge.
pub fn origin_of(doc: &Automerge, attribution: &Attribution, obj: &ObjId) -> Option<Origin> {
    origin_in(doc, attribution, obj, &map_at(doc, obj, "merged_from")?)
}

/// [`origin_of`] for a caller that has read the entry's `merged_from` map (`from`) already.
pub fn origin_in(
    doc: &Automerge,
    attribution: &Attribution,
    obj: &ObjId,
    from: &ObjId,
) -> Option<Origin> {
    let from = from.clone();
    // The entry and its `merged_from` were made in one change, by the server.
    if !server_made(attribution, &from)
        || attribution.change_of(&from) != attribution.change_of(obj)
    {
        return None;
    }
    let household = string_at(doc, &from, "household")?;
    let household = household
        .strip_prefix("automerge:")
        .unwrap_or(&household)
        .parse()
        .ok()?;
    let author_at = |m: &ObjId| -> Option<Author> {
        Some(Author {
            user: string_at(doc, m, "user")?,
            device: string_at(doc, m, "device"),
            received_at_ms: int_at(doc, m, "received_at")?,
        })
    };
    let mut set = BTreeMap::new();
    if let Some(s) = map_at(doc, &from, "set") {
        for field in doc.keys(&s) {
            if let Some(a) = map_at(doc, &s, &field).and_then(|m| author_at(&m)) {
                set.insert(field, a);
            }
        }
    }
    Some(Origin {
        household,
        author: author_at(&from),
        set,
    })
}

/// Who wrote the current value of `field` of the entry `obj` (the value's id is `value`):
/// for a field copied in a merge, who wrote it in the household it came from.
pub fn field_author(
    attribution: &Attribution,
    obj: &ObjId,
    origin: Option<&Origin>,
    field: &str,
    value: &ObjId,
) -> Option<Author> {
    match origin {
        Some(o) if attribution.change_of(value) == attribution.change_of(obj) => {
            o.set.get(field).cloned().or_else(|| o.author.clone())
        }
        _ => attribution.author_of(value).cloned(),
    }
}

/// Reads what a merge of `retired` copies out of it (as it is now), with its authors.
pub fn merge_source(
    doc: &Automerge,
    attribution: &Attribution,
    retired: DocumentId,
) -> MergeSource {
    let mut out = Vec::new();
    for collection in MERGED_COLLECTIONS {
        for (key, obj) in entries(doc, collection) {
            let origin = origin_of(doc, attribution, &obj).unwrap_or_else(|| {
                let created_in = attribution.change_of(&obj);
                let mut set = BTreeMap::new();
                for field in doc.keys(&obj) {
                    if let Some((_, vid)) = doc.get(&obj, field.as_str()).ok().flatten() {
                        if attribution.change_of(&vid) != created_in {
                            if let Some(a) = attribution.author_of(&vid) {
                                set.insert(field, a.clone());
                            }
                        }
                    }
                }
                Origin {
                    household: retired,
                    author: attribution.author_of(&obj).cloned(),
                    set,
                }
            });
            let fields = match read_node(doc, &obj, ObjType::Map) {
                Node::Map(fields) => fields
                    .into_iter()
                    .filter(|(k, _)| k != "merged_from")
                    .collect(),
                _ => Vec::new(),
            };
            out.push(SourceEntry {
                collection,
                key,
                fields,
                origin,
            });
        }
    }
    let review = map_at(doc, &ROOT, "review");
    let comments = review
        .as_ref()
        .and_then(|r| match doc.get(r, "comments").ok().flatten() {
            Some((Value::Object(ObjType::List), list)) => Some(list),
            _ => None,
        })
        .map(|list| match read_node(doc, &list, ObjType::List) {
            Node::List(items) => items
                .into_iter()
                .filter_map(|n| match n {
                    Node::Map(fields) => Some(fields),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        })
        .unwrap_or_default();
    let meeting = review
        .as_ref()
        .and_then(|r| map_at(doc, r, "for_meeting"))
        .map(|marks| {
            doc.keys(&marks)
                .filter_map(|visit| {
                    let m = map_at(doc, &marks, &visit)?;
                    match read_node(doc, &m, ObjType::Map) {
                        Node::Map(fields) => Some((visit, fields)),
                        _ => None,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let previous = merge_mark(doc, attribution);
    let changed_since_previous = previous
        .as_ref()
        .map(|m| changed_after_merge(doc, m))
        .unwrap_or_default();
    MergeSource {
        retired,
        heads: doc.get_heads(),
        previous,
        entries: out,
        comments,
        meeting,
        changed_since_previous,
    }
}

/// The winning value of every field of `obj`, recursively.
fn read_node(doc: &Automerge, obj: &ObjId, kind: ObjType) -> Node {
    let value = |v: Value<'_>, id: ObjId| match v {
        Value::Object(k) => read_node(doc, &id, k),
        Value::Scalar(s) => Node::Scalar(s.into_owned()),
    };
    match kind {
        ObjType::Map | ObjType::Table => Node::Map(
            doc.keys(obj)
                .filter_map(|k| {
                    let (v, id) = doc.get(obj, k.as_str()).ok().flatten()?;
                    Some((k, value(v, id)))
                })
                .collect(),
        ),
        ObjType::List => Node::List(
            (0..doc.length(obj))
                .filter_map(|i| doc.get(obj, i).ok().flatten())
                .map(|(v, id)| value(v, id))
                .collect(),
        ),
        ObjType::Text => Node::Text(doc.text(obj).unwrap_or_default()),
    }
}

fn put_node<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    key: &str,
    node: &Node,
) -> Result<(), RecordError> {
    match node {
        Node::Scalar(s) => {
            tx.put(obj, key, s.clone())?;
        }
        Node::Text(s) => {
            let t = tx.put_object(obj, key, ObjType::Text)?;
            tx.splice_text(&t, 0, 0, s)?;
        }
        Node::Map(fields) => {
            let m = tx.put_object(obj, key, ObjType::Map)?;
            put_fields(tx, &m, fields)?;
        }
        Node::List(items) => {
            let l = tx.put_object(obj, key, ObjType::List)?;
            for (i, item) in items.iter().enumerate() {
                match item {
                    Node::Scalar(s) => tx.insert(&l, i, s.clone())?,
                    Node::Text(s) => {
                        let t = tx.insert_object(&l, i, ObjType::Text)?;
                        tx.splice_text(&t, 0, 0, s)?;
                    }
                    Node::Map(fields) => {
                        let m = tx.insert_object(&l, i, ObjType::Map)?;
                        put_fields(tx, &m, fields)?;
                    }
                    Node::List(_) => {
                        // The schema has no lists of lists; a stray one is kept on the
                        // retired household only.
                    }
                }
            }
        }
    }
    Ok(())
}

fn put_fields<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    fields: &[(String, Node)],
) -> Result<(), RecordError> {
    for (k, v) in fields {
        put_node(tx, obj, k, v)?;
    }
    Ok(())
}

fn put_author<T: Transactable>(tx: &mut T, obj: &ObjId, a: &Author) -> Result<(), RecordError> {
    tx.put(obj, "user", a.user.as_str())?;
    if let Some(d) = &a.device {
        tx.put(obj, "device", d.as_str())?;
    }
    tx.put(obj, "received_at", ScalarValue::Timestamp(a.received_at_ms))?;
    Ok(())
}

fn root_map<T: Transactable>(tx: &mut T, key: &'static str) -> Result<ObjId, RecordError> {
    match tx.get(ROOT, key)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(RecordError::NotAHousehold(format!("no `{key}` map"))),
    }
}

/// A map under `review`, made if the survivor has none yet (only the server writes these).
fn review_child<T: Transactable>(
    tx: &mut T,
    review: &ObjId,
    key: &str,
    kind: ObjType,
) -> Result<ObjId, RecordError> {
    match tx.get(review, key)? {
        Some((Value::Object(k), id)) if k == kind => Ok(id),
        _ => Ok(tx.put_object(review, key, kind)?),
    }
}

/// Copies `source` into the survivor (the transaction's document). Entries it has already
/// are left alone; so are comments it has (same author, time and text) and meeting marks
/// of visits it has marked.
pub fn copy_into_survivor<T: Transactable>(
    tx: &mut T,
    source: &MergeSource,
) -> Result<MergeCopied, RecordError> {
    let mut report = MergeCopied::default();
    for collection in MERGED_COLLECTIONS {
        report.copied.insert(collection.to_string(), 0);
    }
    for e in &source.entries {
        let map = root_map(tx, e.collection)?;
        if tx.get(&map, e.key.as_str())?.is_some() {
            report.already_there += 1;
            let path = format!("{}.{}", e.collection, e.key);
            report.left_on_retired.extend(
                source
                    .changed_since_previous
                    .iter()
                    .filter(|p| p.starts_with(&path) && p[path.len()..].starts_with('.'))
                    .cloned(),
            );
            continue;
        }
        let obj = tx.put_object(&map, e.key.as_str(), ObjType::Map)?;
        put_fields(tx, &obj, &e.fields)?;
        let from = tx.put_object(&obj, "merged_from", ObjType::Map)?;
        tx.put(&from, "household", e.origin.household.to_url())?;
        if let Some(a) = &e.origin.author {
            put_author(tx, &from, a)?;
        }
        if !e.origin.set.is_empty() {
            let set = tx.put_object(&from, "set", ObjType::Map)?;
            for (field, a) in &e.origin.set {
                let m = tx.put_object(&set, field.as_str(), ObjType::Map)?;
                put_author(tx, &m, a)?;
            }
        }
        *report.copied.entry(e.collection.to_string()).or_default() += 1;
    }

    if !source.comments.is_empty() || !source.meeting.is_empty() {
        let review = root_map(tx, "review")?;
        if !source.comments.is_empty() {
            let list = review_child(tx, &review, "comments", ObjType::List)?;
            let same = |a: &[(String, Node)], b: &[(String, Node)]| {
                let pick = |f: &[(String, Node)], k: &str| {
                    f.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
                };
                ["by", "at", "text"]
                    .iter()
                    .all(|k| pick(a, k) == pick(b, k))
            };
            let existing: Vec<Vec<(String, Node)>> = match tx.get(&review, "comments")? {
                Some((Value::Object(ObjType::List), _)) => (0..tx.length(&list))
                    .filter_map(|i| match tx.get(&list, i).ok().flatten() {
                        Some((Value::Object(ObjType::Map), m)) => Some(
                            tx.keys(&m)
                                .filter_map(|k| match tx.get(&m, k.as_str()).ok().flatten() {
                                    Some((Value::Scalar(s), _)) => {
                                        Some((k, Node::Scalar(s.into_owned())))
                                    }
                                    Some((Value::Object(ObjType::Text), t)) => {
                                        Some((k, Node::Text(tx.text(&t).unwrap_or_default())))
                                    }
                                    _ => None,
                                })
                                .collect(),
                        ),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            for c in &source.comments {
                let plain: Vec<(String, Node)> = c
                    .iter()
                    .filter(|(k, _)| k != "merged_from")
                    .cloned()
                    .collect();
                if existing.iter().any(|e| same(e, &plain)) {
                    continue;
                }
                let at = tx.length(&list);
                let item = tx.insert_object(&list, at, ObjType::Map)?;
                put_fields(tx, &item, &plain)?;
                tx.put(&item, "merged_from", source.retired.to_url())?;
                report.comments += 1;
            }
        }
        if !source.meeting.is_empty() {
            let marks = review_child(tx, &review, "for_meeting", ObjType::Map)?;
            for (visit, fields) in &source.meeting {
                if tx.get(&marks, visit.as_str())?.is_none() {
                    let m = tx.put_object(&marks, visit.as_str(), ObjType::Map)?;
                    put_fields(tx, &m, fields)?;
                }
            }
        }
    }
    Ok(report)
}

/// Marks the retired household (the transaction's document) merged into `survivor`, its
/// copy taken at `heads`. A fresh mark replaces an earlier one as a whole.
pub fn mark_merged<T: Transactable>(
    tx: &mut T,
    survivor: DocumentId,
    by: &str,
    at_ms: i64,
    heads: &[ChangeHash],
) -> Result<(), RecordError> {
    let mark = tx.put_object(ROOT, "merged_into", ObjType::Map)?;
    tx.put(&mark, "into", survivor.to_url())?;
    tx.put(&mark, "by", by)?;
    tx.put(&mark, "at", ScalarValue::Timestamp(at_ms))?;
    let list = tx.put_object(&mark, "heads", ObjType::List)?;
    for (i, h) in heads.iter().enumerate() {
        tx.insert(&list, i, h.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::records::{
        add_member, add_visit, create_household, household_detail, Address, NewHousehold,
        NewMember, NewVisit, Premises, VisitMode, VisitOutcome,
    };

    fn household(street: &str) -> Automerge {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        create_household(
            &mut tx,
            &NewHousehold {
                station: "north".into(),
                village: "東村".into(),
                address: Address {
                    street: street.into(),
                    house_no: "12".into(),
                    ..Address::default()
                },
                premises: Premises::Home,
            },
        )
        .unwrap();
        tx.commit();
        doc
    }

    fn visit(doc: &mut Automerge, officer: &str, notes: &str) -> String {
        let mut tx = doc.transaction();
        let id = add_visit(
            &mut tx,
            &NewVisit {
                officer: officer.into(),
                device: format!("{officer}-phone"),
                started_at_ms: 1_000,
                ended_at_ms: 2_000,
                outcome: VisitOutcome::Met,
                mode: VisitMode::InHome,
                people_met: vec!["王太太".into()],
                notes: notes.into(),
                publicity: vec![],
                security_score: Some(4),
                satisfaction: Some(5),
            },
        )
        .unwrap();
        tx.commit();
        id
    }

    /// Authors for every change of `doc` not yet in `authors`: `who` on a device, or the
    /// server when `who` starts with "staff".
    fn attribute(doc: &Automerge, authors: &mut HashMap<ChangeHash, Author>, who: &str, at: i64) {
        for c in doc.get_changes_meta(&[]) {
            authors.entry(c.hash).or_insert_with(|| Author {
                user: who.into(),
                device: (!who.starts_with("staff")).then(|| format!("{who}-phone")),
                received_at_ms: at,
            });
        }
    }

    #[test]
    fn a_merge_copies_every_entry_with_its_first_author_and_marks_the_retired_household() {
        let mut retired = household("林森南路");
        let mut survivor = household("林森南路 ");
        let (mut ra, mut sa) = (HashMap::new(), HashMap::new());
        attribute(&retired, &mut ra, "amy", 10);
        attribute(&survivor, &mut sa, "ben", 11);
        let v1 = visit(&mut retired, "amy", "鄰居吵架，已調解");
        {
            let mut tx = retired.transaction();
            add_member(
                &mut tx,
                &NewMember {
                    name: "王小明".into(),
                    relation: "戶長".into(),
                    birth_year: Some(1970),
                    phone: "0911".into(),
                },
            )
            .unwrap();
            tx.commit();
        }
        attribute(&retired, &mut ra, "amy", 20);
        let v2 = visit(&mut survivor, "ben", "nobody minded");
        attribute(&survivor, &mut sa, "ben", 21);

        let source = merge_source(
            &retired,
            &Attribution::new(&retired, ra.clone()),
            DocumentId::random(),
        );
        let retired_id = source.retired;
        let mut tx = survivor.transaction();
        let report = copy_into_survivor(&mut tx, &source).unwrap();
        tx.commit();
        assert_eq!(report.copied["visits"], 1);
        assert_eq!(report.copied["members"], 1);
        attribute(&survivor, &mut sa, "staff-lin", 30);
        let attribution = Attribution::new(&survivor, sa.clone());
        let detail = household_detail(&survivor, &attribution);
        assert_eq!(detail.visits.len(), 2);
        let copied = detail.visits.iter().find(|e| e.id == v1).unwrap();
        assert_eq!(copied.created_by.as_ref().unwrap().user, "amy");
        assert_eq!(copied.created_by.as_ref().unwrap().received_at_ms, 20);
        assert_eq!(copied.value["notes"], "鄰居吵架，已調解");
        let merged = copied.merged.as_ref().unwrap();
        assert_eq!(merged.from, retired_id.to_url());
        assert_eq!(merged.by.as_ref().unwrap().user, "staff-lin");
        let own = detail.visits.iter().find(|e| e.id == v2).unwrap();
        assert_eq!(own.created_by.as_ref().unwrap().user, "ben");
        assert!(own.merged.is_none());
        assert!(crate::records::validate(&survivor).is_empty());

        // A second merge copies nothing again.
        let mut tx = survivor.transaction();
        let again = copy_into_survivor(&mut tx, &source).unwrap();
        tx.commit();
        assert_eq!(again.copied.values().sum::<usize>(), 0);
        assert_eq!(again.already_there, 2);

        // The mark: honoured when the server wrote it, with what arrived afterwards.
        let survivor_id = DocumentId::random();
        let mut tx = retired.transaction();
        mark_merged(&mut tx, survivor_id, "staff-lin", 30, &source.heads).unwrap();
        tx.commit();
        let mark_change = retired.get_heads();
        attribute(&retired, &mut ra, "staff-lin", 30);
        let attribution = Attribution::new(&retired, ra.clone());
        let mark = merge_mark(&retired, &attribution).unwrap();
        assert_eq!(mark.into, survivor_id);
        assert!(changed_after_merge(&retired, &mark).is_empty());
        assert_eq!(
            merge_mark_written_in(&retired, &mark_change),
            Some(survivor_id)
        );
        let late = visit(&mut retired, "amy", "late");
        attribute(&retired, &mut ra, "amy", 40);
        assert_eq!(
            changed_after_merge(&retired, &mark),
            vec![format!("visits.{late}")]
        );
        assert_eq!(merge_mark_written_in(&retired, &retired.get_heads()), None);
    }

    #[test]
    fn marks_written_by_a_device_are_not_honoured() {
        let mut doc = household("East Rd");
        let mut authors = HashMap::new();
        let mut tx = doc.transaction();
        mark_merged(&mut tx, DocumentId::random(), "mallory", 1, &[]).unwrap();
        tx.commit();
        attribute(&doc, &mut authors, "mallory", 1);
        assert_eq!(merge_mark(&doc, &Attribution::new(&doc, authors)), None);

        // A device's entry that claims to be a copy is shown as the device's own.
        let mut doc = household("East Rd");
        let mut authors = HashMap::new();
        let v = visit(&mut doc, "mallory", "mine");
        let mut tx = doc.transaction();
        let visits = root_map(&mut tx, "visits").unwrap();
        let (_, obj) = tx.get(&visits, v.as_str()).unwrap().unwrap();
        let from = tx.put_object(&obj, "merged_from", ObjType::Map).unwrap();
        tx.put(&from, "household", DocumentId::random().to_url())
            .unwrap();
        tx.put(&from, "user", "amy").unwrap();
        tx.put(&from, "received_at", ScalarValue::Timestamp(1))
            .unwrap();
        tx.commit();
        attribute(&doc, &mut authors, "mallory", 5);
        let attribution = Attribution::new(&doc, authors);
        let detail = household_detail(&doc, &attribution);
        assert_eq!(
            detail.visits[0].created_by.as_ref().unwrap().user,
            "mallory"
        );
        assert!(detail.visits[0].merged.is_none());
    }
}
