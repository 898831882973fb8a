//! The staff view of one household: the merged current value as JSON, every field that
//! holds concurrent values with each value's author, each visit / matter / follow-up /
//! member with who created it and who last set each of its fields, the review with what
//! changed since the approval, and the history of changes with the fields each touched.
//! Must not do I/O; authors come in through [`Attribution`].

use std::collections::{BTreeMap, BTreeSet};

use automerge::{Automerge, ChangeHash, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value, ROOT};
use serde_json::{json, Map as JsonMap, Value as Json};

use super::attribution::{Attribution, Author};
use super::merge::{field_author, origin_of};
use super::read::{map_at, string_at};
use super::schema::scalar_int;
use super::summary::{entries, int_at};

/// One value of a contested field.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ConflictValue {
    pub value: Json,
    pub author: Option<Author>,
}

/// A field holding concurrent values: the first value is the one Automerge shows as current.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Conflict {
    /// Dotted path: `members.<id>.phone`.
    pub path: String,
    pub values: Vec<ConflictValue>,
}

/// An entry of visits, matters, follow-ups or members.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Entry {
    pub id: String,
    pub value: Json,
    /// Who delivered the change that created the entry.
    pub created_by: Option<Author>,
    /// Fields whose current value someone other than the creator set (or the creator in a
    /// later change): who set it.
    pub set_by: BTreeMap<String, Author>,
    /// Set when a merge copied the entry from another household: `created_by` and
    /// `set_by` are then who wrote it there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged: Option<MergedEntry>,
}

/// Where a copied entry came from.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MergedEntry {
    /// The household it was first recorded in (`automerge:` URL).
    pub from: String,
    /// The staff member whose merge copied it.
    pub by: Option<Author>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Review {
    pub state: String,
    pub by: String,
    pub at_ms: Option<i64>,
    #[serde(serialize_with = "hashes_as_hex")]
    pub approved_heads: Vec<ChangeHash>,
    pub comments: Json,
    pub changed_since_approval: bool,
    /// Fields changed after the approval (outside `review`).
    pub changed_fields: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HouseholdDetail {
    #[serde(serialize_with = "hashes_as_hex")]
    pub heads: Vec<ChangeHash>,
    /// The merged document (where fields conflict, the value Automerge shows as current).
    pub value: Json,
    pub members: Vec<Entry>,
    pub visits: Vec<Entry>,
    pub matters: Vec<Entry>,
    pub follow_ups: Vec<Entry>,
    pub conflicts: Vec<Conflict>,
    pub review: Review,
}

/// One change in a household's history.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HistoryEntry {
    #[serde(serialize_with = "hash_as_hex")]
    pub hash: ChangeHash,
    pub author: Option<Author>,
    /// Dotted paths of the fields the change set, inserted into or deleted.
    pub fields: Vec<String>,
}

fn hashes_as_hex<S: serde::Serializer>(h: &[ChangeHash], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(h.iter().map(|h| h.to_string()))
}

fn hash_as_hex<S: serde::Serializer>(h: &ChangeHash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&h.to_string())
}

pub fn household_detail(doc: &Automerge, attribution: &Attribution) -> HouseholdDetail {
    let entries_of = |key: &str| -> Vec<Entry> {
        let mut out: Vec<Entry> = entries(doc, key)
            .into_iter()
            .map(|(id, obj)| {
                let origin = origin_of(doc, attribution, &obj);
                let created_in = attribution.change_of(&obj);
                let mut set_by = BTreeMap::new();
                for field in doc.keys(&obj) {
                    if field == "merged_from" {
                        continue;
                    }
                    if let Some((_, vid)) = doc.get(&obj, field.as_str()).ok().flatten() {
                        let author = match &origin {
                            // A copy's fields were all written by the merge; who set them
                            // first is in its origin.
                            Some(o) if attribution.change_of(&vid) == created_in => {
                                o.set.get(&field).cloned()
                            }
                            _ if attribution.change_of(&vid) == created_in => None,
                            _ => field_author(attribution, &obj, None, &field, &vid),
                        };
                        if let Some(a) = author {
                            set_by.insert(field, a);
                        }
                    }
                }
                let mut value = to_json(doc, &obj, ObjType::Map);
                if let (Some(_), Json::Object(m)) = (&origin, &mut value) {
                    m.remove("merged_from");
                }
                Entry {
                    value,
                    created_by: match &origin {
                        Some(o) => o.author.clone(),
                        None => attribution.author_of(&obj).cloned(),
                    },
                    set_by,
                    merged: origin.map(|o| MergedEntry {
                        from: o.household.to_url(),
                        by: attribution.author_of(&obj).cloned(),
                    }),
                    id,
                }
            })
            .collect();
        // Oldest first by server time, then id: a stable timeline.
        out.sort_by(|a, b| {
            let at = |e: &Entry| e.created_by.as_ref().map(|a| a.received_at_ms);
            (at(a), &a.id).cmp(&(at(b), &b.id))
        });
        out
    };
    let review = review_of(doc);
    let changed_fields = if review.state == "approved" {
        changed_since(doc, &review.approved_heads).unwrap_or_default()
    } else {
        Vec::new()
    };
    HouseholdDetail {
        heads: doc.get_heads(),
        value: to_json(doc, &ROOT, ObjType::Map),
        members: entries_of("members"),
        visits: entries_of("visits"),
        matters: entries_of("matters"),
        follow_ups: entries_of("follow_ups"),
        conflicts: conflicts(doc, attribution),
        review: Review {
            changed_since_approval: !changed_fields.is_empty(),
            changed_fields,
            ..review
        },
    }
}

/// The review map as it stands (changed fields not yet computed).
pub(crate) fn review_of(doc: &Automerge) -> Review {
    let review = map_at(doc, &ROOT, "review");
    let (state, by, at_ms, approved_heads, comments) = match &review {
        Some(r) => {
            let heads = match doc.get(r, "approved_heads").ok().flatten() {
                Some((Value::Object(ObjType::List), list)) => (0..doc.length(&list))
                    .filter_map(|i| match doc.get(&list, i).ok().flatten() {
                        Some((Value::Scalar(s), _)) => match s.as_ref() {
                            ScalarValue::Str(h) => h.parse::<ChangeHash>().ok(),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let comments = match doc.get(r, "comments").ok().flatten() {
                Some((Value::Object(ObjType::List), list)) => to_json(doc, &list, ObjType::List),
                _ => json!([]),
            };
            (
                string_at(doc, r, "state").unwrap_or_default(),
                string_at(doc, r, "by").unwrap_or_default(),
                int_at(doc, r, "at"),
                heads,
                comments,
            )
        }
        None => (String::new(), String::new(), None, Vec::new(), json!([])),
    };
    Review {
        state,
        by,
        at_ms,
        approved_heads,
        comments,
        changed_since_approval: false,
        changed_fields: Vec::new(),
    }
}

/// The fields changed after `heads`, outside `review`. `None` if `heads` is empty or names a
/// change the document does not have.
pub(crate) fn changed_since(doc: &Automerge, heads: &[ChangeHash]) -> Option<Vec<String>> {
    if heads.is_empty()
        || heads
            .iter()
            .any(|h| doc.get_change_meta_by_hash(h).is_none())
    {
        return None;
    }
    let fields = touched(doc, heads, &doc.get_heads());
    Some(
        fields
            .into_iter()
            .filter(|f| f != "review" && !f.starts_with("review."))
            .collect(),
    )
}

/// Dotted paths of everything that differs between `before` and `after`.
pub(crate) fn touched(doc: &Automerge, before: &[ChangeHash], after: &[ChangeHash]) -> Vec<String> {
    let mut out = BTreeSet::new();
    for patch in doc.diff(before, after) {
        let mut path: Vec<String> = patch.path.iter().map(|(_, p)| prop_str(p)).collect();
        use automerge::PatchAction as A;
        match &patch.action {
            A::PutMap { key, .. } | A::DeleteMap { key } => path.push(key.clone()),
            A::Increment { prop, .. } | A::Conflict { prop } => path.push(prop_str(prop)),
            _ => {}
        }
        out.insert(path.join("."));
    }
    // A new entry is one field: "visits.<id>", not each of its fields.
    let mut minimal: Vec<String> = Vec::new();
    for p in out {
        if !minimal
            .last()
            .is_some_and(|m| p.starts_with(m.as_str()) && p[m.len()..].starts_with('.'))
        {
            minimal.push(p);
        }
    }
    minimal
}

fn prop_str(p: &Prop) -> String {
    match p {
        Prop::Map(k) => k.clone(),
        Prop::Seq(i) => i.to_string(),
    }
}

/// The household's changes in `order` (server order), each with its author and the fields
/// it touched.
pub fn history(
    doc: &Automerge,
    attribution: &Attribution,
    order: &[ChangeHash],
) -> Vec<HistoryEntry> {
    order
        .iter()
        .filter_map(|hash| {
            let meta = doc.get_change_meta_by_hash(hash)?;
            let deps = meta.deps.clone();
            Some(HistoryEntry {
                hash: *hash,
                author: attribution.author_of_change(hash).cloned(),
                fields: touched(doc, &deps, &[*hash]),
            })
        })
        .collect()
}

/// Every map key (at any depth) holding more than one concurrent value.
pub fn conflicts(doc: &Automerge, attribution: &Attribution) -> Vec<Conflict> {
    let mut out = Vec::new();
    walk_conflicts(doc, &ROOT, &mut Vec::new(), &mut |path, values| {
        out.push(Conflict {
            path: path.join("."),
            values: values
                .iter()
                .map(|(v, id)| ConflictValue {
                    value: value_json(doc, v, id),
                    author: attribution.author_of(id).cloned(),
                })
                .collect(),
        })
    });
    out
}

/// How many map keys [`conflicts`] lists, without reading their values or authors.
pub fn conflict_count(doc: &Automerge) -> usize {
    let mut n = 0;
    walk_conflicts(doc, &ROOT, &mut Vec::new(), &mut |_, _| n += 1);
    n
}

/// What [`walk_conflicts`] calls with each conflicted key: its path and its values.
type OnConflict<'a> = dyn FnMut(&[String], &[(Value<'_>, ObjId)]) + 'a;

/// Calls `each` with the path and values of every conflicted map key under `obj`.
fn walk_conflicts(doc: &Automerge, obj: &ObjId, path: &mut Vec<String>, each: &mut OnConflict<'_>) {
    // One pass over the map; only keys flagged as conflicted are looked up again (a lookup
    // per key made this the most expensive part of projecting a household).
    for item in doc.map_range(obj, ..) {
        path.push(item.key.to_string());
        if item.conflict {
            let values = doc.get_all(obj, item.key.as_ref()).unwrap_or_default();
            each(path, &values);
            if let Some((Value::Object(ObjType::Map), child)) = values.first() {
                walk_conflicts(doc, child, path, each);
            }
        } else if matches!(item.value, automerge::ValueRef::Object(ObjType::Map)) {
            walk_conflicts(doc, &item.id(), path, each);
        }
        path.pop();
    }
}

/// The merged value of `obj` as JSON: text as strings, timestamps as ms numbers.
pub fn to_json(doc: &Automerge, obj: &ObjId, kind: ObjType) -> Json {
    match kind {
        ObjType::Map | ObjType::Table => {
            let mut m = JsonMap::new();
            for key in doc.keys(obj) {
                if let Some((v, id)) = doc.get(obj, key.as_str()).ok().flatten() {
                    m.insert(key, value_json(doc, &v, &id));
                }
            }
            Json::Object(m)
        }
        ObjType::List => Json::Array(
            (0..doc.length(obj))
                .filter_map(|i| doc.get(obj, i).ok().flatten())
                .map(|(v, id)| value_json(doc, &v, &id))
                .collect(),
        ),
        ObjType::Text => Json::String(doc.text(obj).unwrap_or_default()),
    }
}

fn value_json(doc: &Automerge, v: &Value<'_>, id: &ObjId) -> Json {
    match v {
        Value::Object(kind) => to_json(doc, id, *kind),
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => Json::String(s.to_string()),
            ScalarValue::Boolean(b) => Json::Bool(*b),
            ScalarValue::F64(f) => json!(f),
            ScalarValue::Null => Json::Null,
            other => match scalar_int(other) {
                Some(i) => json!(i),
                None => Json::String(other.to_string()),
            },
        },
    }
}
