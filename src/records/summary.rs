//! What the staff lists, counters and the CSV export need to know about one household,
//! computed from its document alone (plus the authors the server recorded): address label,
//! visits (one export row each), open matters, follow-ups, review state, how many fields hold
//! concurrent values, and whether the document conforms. The projection stores this per
//! household and rebuilds it from scratch on `reindex`, so it must be a pure function of
//! its inputs. Must not do I/O.

use std::collections::BTreeMap;

use automerge::{Automerge, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::attribution::{Attribution, Author};
use super::detail::{changed_since, conflict_count, review_of};
use super::merge::{changed_after_merge, field_author, merge_mark, origin_in, MergeMark};
use super::read::{string_at, strings_at, Fields};
use super::schema::{scalar_int, validate, FollowUpStatus, MatterStatus};

/// One visit, flattened for the export and the lists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VisitRow {
    pub id: String,
    /// What the device wrote as the officer (self-declared).
    pub officer: String,
    /// Who delivered the visit, as the server recorded it (evidence).
    pub author: Option<Author>,
    /// Device clock, ms since the epoch.
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    pub outcome: String,
    pub mode: String,
    pub people_met: Vec<String>,
    pub publicity: Vec<String>,
    pub security_score: Option<i64>,
    pub satisfaction: Option<i64>,
    pub notes: String,
    /// Staff chose these notes for the police–community meeting (`review.for_meeting`).
    #[serde(default)]
    pub for_meeting: bool,
}

/// A follow-up as the lists need it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FollowUpBrief {
    pub id: String,
    pub task: String,
    pub owner: String,
    pub status: String,
    pub due_ms: Option<i64>,
}

/// A matter as the lists need it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MatterBrief {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub risk: String,
    pub open: bool,
    /// Empty for confidential matters (tips): lists and exports do not show them.
    pub description: String,
    pub confidential: bool,
    /// Server receive time of the change that raised it (rows projected before this was
    /// kept have none until `fieldsync reindex`).
    #[serde(default)]
    pub raised_at_ms: Option<i64>,
    /// Server receive time of the change that set its current status.
    #[serde(default)]
    pub status_set_at_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HouseholdSummary {
    pub address_label: String,
    /// Every concurrent value of `premises`.
    pub premises: Vec<String>,
    pub visit_count: u32,
    /// Server receive time of the latest visit (device clocks are not evidence).
    pub last_visit_at_ms: Option<i64>,
    /// The accounts that delivered visits.
    pub officers: Vec<String>,
    pub matters: Vec<MatterBrief>,
    /// Open matters per kind.
    pub open_matters: BTreeMap<String, u32>,
    pub follow_ups: Vec<FollowUpBrief>,
    pub review_state: String,
    /// Approved, and changed (outside `review`) since.
    pub changed_since_approval: bool,
    /// Fields holding concurrent values.
    pub conflicts: u32,
    /// Why the document does not conform (empty: it does).
    pub quarantine: Vec<String>,
    /// Lower-cased address, members and notes, for the text filter.
    pub search_text: String,
    /// The normalised street and house number (`records::address_key`): households of one
    /// village with the same key are likely one address registered twice.
    #[serde(default)]
    pub address_key: String,
    /// Set when staff merged this household into another (the survivor): it leaves the
    /// lists and counts, and stays stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<MergeMark>,
    /// What changed on it after it was merged (dotted paths): an officer's late offline
    /// visit, to be copied by running the merge again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_merge: Vec<String>,
    pub visits: Vec<VisitRow>,
}

/// Caps the search text per household (a few pages of notes).
const SEARCH_TEXT_MAX_BYTES: usize = 16 * 1024;

pub fn summarise(doc: &Automerge, attribution: &Attribution) -> HouseholdSummary {
    let quarantine = validate(doc);
    let address_label = super::read::address_label(doc);
    let mut search = vec![address_label.clone()];

    let root = Fields::of(doc, &ROOT);
    let text = |f: &Fields, key: &str| f.string(doc, key).unwrap_or_default();
    let for_meeting: std::collections::HashSet<String> =
        super::read::meeting_marks(doc).into_iter().collect();
    let mut visits = Vec::new();
    for (id, obj) in entries_of(doc, &root, "visits") {
        let f = Fields::of(doc, &obj);
        let notes = text(&f, "notes");
        search.push(notes.clone());
        // A visit copied in a merge counts as its officer's, when the server received it.
        let author = match f
            .map("merged_from")
            .and_then(|from| origin_in(doc, attribution, &obj, &from))
        {
            Some(o) => o.author,
            None => attribution.author_of(&obj).cloned(),
        };
        visits.push(VisitRow {
            officer: text(&f, "officer"),
            author,
            started_at_ms: int_of(&f, "started_at"),
            ended_at_ms: int_of(&f, "ended_at"),
            outcome: text(&f, "outcome"),
            mode: text(&f, "mode"),
            people_met: list_strings(doc, &f, "people_met"),
            publicity: list_strings(doc, &f, "publicity"),
            security_score: int_of(&f, "security_score"),
            satisfaction: int_of(&f, "satisfaction"),
            notes,
            for_meeting: for_meeting.contains(&id),
            id,
        });
    }
    visits.sort_by(|a, b| {
        let at = |v: &VisitRow| v.author.as_ref().map(|a| a.received_at_ms);
        (at(a), a.started_at_ms, &a.id).cmp(&(at(b), b.started_at_ms, &b.id))
    });
    let last_visit_at_ms = visits
        .iter()
        .filter_map(|v| v.author.as_ref().map(|a| a.received_at_ms))
        .max();
    let mut officers: Vec<String> = visits
        .iter()
        .filter_map(|v| v.author.as_ref().map(|a| a.user.clone()))
        .collect();
    officers.sort();
    officers.dedup();

    for (_, obj) in entries_of(doc, &root, "members") {
        search.push(string_at(doc, &obj, "name").unwrap_or_default());
    }

    let mut matters = Vec::new();
    let mut open_matters = BTreeMap::new();
    for (id, obj) in entries_of(doc, &root, "matters") {
        let f = Fields::of(doc, &obj);
        let status = text(&f, "status");
        let kind = text(&f, "kind");
        let open = MatterStatus::parse(&status).is_some_and(MatterStatus::is_open);
        if open {
            *open_matters.entry(kind.clone()).or_insert(0) += 1;
        }
        let confidential = matches!(
            f.get("confidential"),
            Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Boolean(true))
        );
        let description = if confidential {
            String::new()
        } else {
            text(&f, "description")
        };
        search.push(description.clone());
        let origin = f
            .map("merged_from")
            .and_then(|from| origin_in(doc, attribution, &obj, &from));
        let raised_at_ms = match &origin {
            Some(o) => o.author.as_ref().map(|a| a.received_at_ms),
            None => attribution.author_of(&obj).map(|a| a.received_at_ms),
        };
        let status_set_at_ms = f.get("status").and_then(|(_, value)| {
            field_author(attribution, &obj, origin.as_ref(), "status", value)
                .map(|a| a.received_at_ms)
        });
        matters.push(MatterBrief {
            id,
            kind,
            risk: text(&f, "risk"),
            open,
            description,
            confidential,
            raised_at_ms,
            status_set_at_ms,
            status,
        });
    }

    let mut follow_ups = Vec::new();
    for (id, obj) in entries_of(doc, &root, "follow_ups") {
        let f = Fields::of(doc, &obj);
        let task = text(&f, "task");
        search.push(task.clone());
        follow_ups.push(FollowUpBrief {
            id,
            task,
            owner: text(&f, "owner"),
            status: text(&f, "status"),
            due_ms: int_of(&f, "due"),
        });
    }

    let review = review_of(doc);
    let changed_since_approval = review.state == "approved"
        && changed_since(doc, &review.approved_heads)
            .map(|fields| !fields.is_empty())
            .unwrap_or(false);

    let mut search_text = search
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
        .to_lowercase();
    if search_text.len() > SEARCH_TEXT_MAX_BYTES {
        let mut cut = SEARCH_TEXT_MAX_BYTES;
        while !search_text.is_char_boundary(cut) {
            cut -= 1;
        }
        search_text.truncate(cut);
    }

    let merged_into = merge_mark(doc, attribution);
    let after_merge = merged_into
        .as_ref()
        .map(|m| changed_after_merge(doc, m))
        .unwrap_or_default();

    HouseholdSummary {
        merged_into,
        after_merge,
        address_label,
        premises: strings_at(doc, &ROOT, "premises"),
        visit_count: visits.len() as u32,
        last_visit_at_ms,
        officers,
        matters,
        open_matters,
        follow_ups,
        review_state: review.state,
        changed_since_approval,
        conflicts: conflict_count(doc) as u32,
        quarantine,
        search_text,
        address_key: super::read::address_key(doc),
        visits,
    }
}

impl HouseholdSummary {
    /// Open follow-ups whose due date is before `now_ms`.
    /// The earliest due time of a follow-up still to do: some are overdue at `now_ms`
    /// exactly when it is before `now_ms` (what a database indexes instead of the list).
    pub fn first_due_ms(&self) -> Option<i64> {
        self.follow_ups
            .iter()
            .filter(|f| FollowUpStatus::parse(&f.status) == Some(FollowUpStatus::Todo))
            .filter_map(|f| f.due_ms)
            .min()
    }

    /// Follow-ups still to do.
    pub fn follow_ups_todo(&self) -> usize {
        self.follow_ups
            .iter()
            .filter(|f| FollowUpStatus::parse(&f.status) == Some(FollowUpStatus::Todo))
            .count()
    }

    pub fn overdue(&self, now_ms: i64) -> usize {
        self.follow_ups
            .iter()
            .filter(|f| {
                FollowUpStatus::parse(&f.status) == Some(FollowUpStatus::Todo)
                    && f.due_ms.is_some_and(|d| d < now_ms)
            })
            .count()
    }
}

/// The entries (id, object) of the root map `key`, by id.
pub(crate) fn entries(doc: &Automerge, key: &str) -> Vec<(String, ObjId)> {
    entries_of(doc, &Fields::of(doc, &ROOT), key)
}

/// The entries (id, map object) of the collection `key` of `root` (read once), by id.
fn entries_of(doc: &Automerge, root: &Fields, key: &str) -> Vec<(String, ObjId)> {
    let Some(map) = root.map(key) else {
        return Vec::new();
    };
    Fields::of(doc, &map)
        .iter()
        .filter(|(_, (v, _))| matches!(v, Value::Object(ObjType::Map)))
        .map(|(k, (_, id))| (k.to_string(), id.clone()))
        .collect()
}

fn int_of(f: &Fields, key: &str) -> Option<i64> {
    match f.get(key) {
        Some((Value::Scalar(s), _)) => scalar_int(s),
        _ => None,
    }
}

pub(crate) fn int_at(doc: &Automerge, obj: &ObjId, key: &str) -> Option<i64> {
    match doc.get(obj, key).ok().flatten() {
        Some((Value::Scalar(s), _)) => scalar_int(&s),
        _ => None,
    }
}

fn list_strings(doc: &Automerge, f: &Fields, key: &str) -> Vec<String> {
    let list = match f.get(key) {
        Some((Value::Object(ObjType::List), id)) => id.clone(),
        _ => return Vec::new(),
    };
    // One pass over the list (a lookup per index seeks through the operations each time).
    doc.list_range(&list, ..)
        .filter_map(|item| match item.value {
            automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(s)) => Some(s.into_owned()),
            automerge::ValueRef::Object(ObjType::Text) => doc.text(item.id()).ok(),
            _ => None,
        })
        .collect()
}
