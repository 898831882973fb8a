//! Typed writes of the household schema (DESIGN.md §2, proto-docs/data-model.md).

use automerge::transaction::Transactable;
use automerge::{ObjType, ScalarValue, ROOT};

use super::schema::{
    FollowUpStatus, MatterKind, MatterStatus, Premises, ReviewState, Risk, VisitMode, VisitOutcome,
};
use super::{RecordError, SCHEMA_VERSION};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Address {
    pub township: String,
    pub village: String,
    pub group: String,
    pub street: String,
    pub house_no: String,
    pub landmark: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewHousehold {
    pub station: String,
    pub village: String,
    pub address: Address,
    pub premises: Premises,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVisit {
    pub officer: String,
    pub device: String,
    /// Device clock, ms since the epoch (not evidence: the server records its own time).
    pub started_at_ms: i64,
    pub ended_at_ms: i64,
    pub outcome: VisitOutcome,
    pub mode: VisitMode,
    pub people_met: Vec<String>,
    pub notes: String,
    pub publicity: Vec<String>,
    pub security_score: Option<u8>,
    pub satisfaction: Option<u8>,
}

/// Writes a new household into an empty document, creating every nested container now so
/// that no two devices ever create the same container concurrently.
pub fn create_household<T: Transactable>(tx: &mut T, h: &NewHousehold) -> Result<(), RecordError> {
    if h.village.trim().is_empty() {
        return Err(RecordError::Invalid {
            field: "village",
            reason: "must not be empty".into(),
        });
    }
    tx.put(ROOT, "type", "household")?;
    tx.put(ROOT, "schema", SCHEMA_VERSION)?;
    tx.put(ROOT, "station", h.station.as_str())?;
    tx.put(ROOT, "village", h.village.as_str())?;
    let address = tx.put_object(ROOT, "address", ObjType::Map)?;
    for (k, v) in [
        ("township", &h.address.township),
        ("village", &h.address.village),
        ("group", &h.address.group),
        ("street", &h.address.street),
        ("house_no", &h.address.house_no),
        ("landmark", &h.address.landmark),
    ] {
        tx.put(&address, k, v.as_str())?;
    }
    tx.put_object(ROOT, "geo", ObjType::Map)?;
    tx.put(ROOT, "premises", h.premises.as_str())?;
    for map in ["members", "visits", "matters", "follow_ups"] {
        tx.put_object(ROOT, map, ObjType::Map)?;
    }
    let review = tx.put_object(ROOT, "review", ObjType::Map)?;
    tx.put(&review, "state", "received")?;
    tx.put_object(&review, "approved_heads", ObjType::List)?;
    tx.put_object(&review, "comments", ObjType::List)?;
    Ok(())
}

fn check_score(field: &'static str, v: Option<u8>) -> Result<(), RecordError> {
    match v {
        Some(s) if !(1..=5).contains(&s) => Err(RecordError::Invalid {
            field,
            reason: format!("{s} is outside 1-5"),
        }),
        _ => Ok(()),
    }
}

/// Adds a visit under a fresh UUID and returns the UUID.
pub fn add_visit<T: Transactable>(tx: &mut T, v: &NewVisit) -> Result<String, RecordError> {
    check_score("security_score", v.security_score)?;
    check_score("satisfaction", v.satisfaction)?;
    let visits = match tx.get(ROOT, "visits")? {
        Some((automerge::Value::Object(ObjType::Map), id)) => id,
        _ => return Err(RecordError::NotAHousehold("no `visits` map".into())),
    };
    let key = uuid::Uuid::new_v4().to_string();
    let visit = tx.put_object(&visits, key.as_str(), ObjType::Map)?;
    tx.put(&visit, "officer", v.officer.as_str())?;
    tx.put(&visit, "device", v.device.as_str())?;
    tx.put(
        &visit,
        "started_at",
        ScalarValue::Timestamp(v.started_at_ms),
    )?;
    tx.put(&visit, "ended_at", ScalarValue::Timestamp(v.ended_at_ms))?;
    tx.put(&visit, "outcome", v.outcome.as_str())?;
    tx.put(&visit, "mode", v.mode.as_str())?;
    let people = tx.put_object(&visit, "people_met", ObjType::List)?;
    for (i, p) in v.people_met.iter().enumerate() {
        tx.insert(&people, i, p.as_str())?;
    }
    let notes = tx.put_object(&visit, "notes", ObjType::Text)?;
    tx.splice_text(&notes, 0, 0, &v.notes)?;
    let publicity = tx.put_object(&visit, "publicity", ObjType::List)?;
    for (i, p) in v.publicity.iter().enumerate() {
        tx.insert(&publicity, i, p.as_str())?;
    }
    if let Some(s) = v.security_score {
        tx.put(&visit, "security_score", i64::from(s))?;
    }
    if let Some(s) = v.satisfaction {
        tx.put(&visit, "satisfaction", i64::from(s))?;
    }
    Ok(key)
}

pub fn set_premises<T: Transactable>(tx: &mut T, p: Premises) -> Result<(), RecordError> {
    tx.put(ROOT, "premises", p.as_str())?;
    Ok(())
}

/// Sets one field of `address` (township, village, group, street, house_no, landmark).
pub fn set_address_field<T: Transactable>(
    tx: &mut T,
    field: &str,
    value: &str,
) -> Result<(), RecordError> {
    const FIELDS: [&str; 6] = [
        "township", "village", "group", "street", "house_no", "landmark",
    ];
    let Some(field) = FIELDS.iter().find(|f| **f == field) else {
        return Err(RecordError::Invalid {
            field: "address",
            reason: format!("unknown field `{field}`; one of {FIELDS:?}"),
        });
    };
    let address = match tx.get(ROOT, "address")? {
        Some((automerge::Value::Object(ObjType::Map), id)) => id,
        _ => return Err(RecordError::NotAHousehold("no `address` map".into())),
    };
    tx.put(&address, *field, value)?;
    Ok(())
}

/// The map under `key` of the root (visits, members, matters, follow_ups, review).
fn root_map<T: Transactable>(tx: &T, key: &'static str) -> Result<automerge::ObjId, RecordError> {
    match tx.get(ROOT, key)? {
        Some((automerge::Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(RecordError::NotAHousehold(format!("no `{key}` map"))),
    }
}

/// The entry `id` of the root map `key`.
fn entry<T: Transactable>(
    tx: &T,
    key: &'static str,
    id: &str,
) -> Result<automerge::ObjId, RecordError> {
    let map = root_map(tx, key)?;
    match tx.get(&map, id)? {
        Some((automerge::Value::Object(ObjType::Map), obj)) => Ok(obj),
        _ => Err(RecordError::NoSuchEntry {
            map: key,
            id: id.to_string(),
        }),
    }
}

/// A person living at the address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewMember {
    pub name: String,
    /// Free text: "head", "spouse", "tenant", ...
    pub relation: String,
    pub birth_year: Option<i64>,
    pub phone: String,
}

/// Adds a member under a fresh UUID and returns the UUID.
pub fn add_member<T: Transactable>(tx: &mut T, m: &NewMember) -> Result<String, RecordError> {
    if m.name.trim().is_empty() {
        return Err(RecordError::Invalid {
            field: "name",
            reason: "must not be empty".into(),
        });
    }
    let members = root_map(tx, "members")?;
    let key = uuid::Uuid::new_v4().to_string();
    let member = tx.put_object(&members, key.as_str(), ObjType::Map)?;
    tx.put(&member, "name", m.name.as_str())?;
    tx.put(&member, "relation", m.relation.as_str())?;
    if let Some(y) = m.birth_year {
        tx.put(&member, "birth_year", y)?;
    }
    tx.put(&member, "phone", m.phone.as_str())?;
    tx.put_object(&member, "flags", ObjType::List)?;
    Ok(key)
}

/// Sets `name`, `relation` or `phone` of a member (a correction; concurrent corrections are
/// all kept as conflicting values).
pub fn set_member_field<T: Transactable>(
    tx: &mut T,
    member: &str,
    field: &str,
    value: &str,
) -> Result<(), RecordError> {
    const FIELDS: [&str; 3] = ["name", "relation", "phone"];
    let Some(field) = FIELDS.iter().find(|f| **f == field) else {
        return Err(RecordError::Invalid {
            field: "member",
            reason: format!("unknown field `{field}`; one of {FIELDS:?}"),
        });
    };
    let obj = entry(tx, "members", member)?;
    tx.put(&obj, *field, value)?;
    Ok(())
}

/// Changes a visit after the fact: its outcome and the notes (edited in place, so a
/// concurrent edit of the notes by someone else merges character by character).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VisitEdit {
    pub outcome: Option<VisitOutcome>,
    pub notes: Option<String>,
}

pub fn edit_visit<T: Transactable>(
    tx: &mut T,
    visit: &str,
    edit: &VisitEdit,
) -> Result<(), RecordError> {
    let obj = entry(tx, "visits", visit)?;
    if let Some(o) = edit.outcome {
        tx.put(&obj, "outcome", o.as_str())?;
    }
    if let Some(notes) = &edit.notes {
        match tx.get(&obj, "notes")? {
            Some((automerge::Value::Object(ObjType::Text), text)) => {
                tx.update_text(&text, notes)?
            }
            _ => tx.put(&obj, "notes", notes.as_str())?,
        }
    }
    Ok(())
}

/// Something a resident raised during a visit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMatter {
    /// The visit it was raised in (its UUID).
    pub visit: String,
    pub kind: MatterKind,
    pub description: String,
    pub risk: Risk,
    /// Confidential matters (tips) are exported without their description.
    pub confidential: bool,
}

pub fn add_matter<T: Transactable>(tx: &mut T, m: &NewMatter) -> Result<String, RecordError> {
    let matters = root_map(tx, "matters")?;
    let key = uuid::Uuid::new_v4().to_string();
    let obj = tx.put_object(&matters, key.as_str(), ObjType::Map)?;
    tx.put(&obj, "visit", m.visit.as_str())?;
    tx.put(&obj, "kind", m.kind.as_str())?;
    let text = tx.put_object(&obj, "description", ObjType::Text)?;
    tx.splice_text(&text, 0, 0, &m.description)?;
    tx.put(&obj, "risk", m.risk.as_str())?;
    tx.put(&obj, "status", MatterStatus::New.as_str())?;
    tx.put_object(&obj, "actions", ObjType::List)?;
    tx.put(&obj, "confidential", m.confidential)?;
    Ok(key)
}

/// Moves a matter to `status` and records what was done (`by` is the account name).
pub fn update_matter<T: Transactable>(
    tx: &mut T,
    matter: &str,
    status: MatterStatus,
    by: &str,
    at_ms: i64,
    action: &str,
) -> Result<(), RecordError> {
    let obj = entry(tx, "matters", matter)?;
    tx.put(&obj, "status", status.as_str())?;
    if !action.is_empty() {
        let actions = match tx.get(&obj, "actions")? {
            Some((automerge::Value::Object(ObjType::List), id)) => id,
            _ => {
                return Err(RecordError::NotAHousehold(
                    "a matter without `actions`".into(),
                ))
            }
        };
        let at = tx.length(&actions);
        let item = tx.insert_object(&actions, at, ObjType::Map)?;
        tx.put(&item, "at", ScalarValue::Timestamp(at_ms))?;
        tx.put(&item, "by", by)?;
        tx.put(&item, "text", action)?;
    }
    Ok(())
}

/// A task someone must do for the household (often for a matter), by a due date.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewFollowUp {
    /// The matter it follows up, if any (its UUID).
    pub matter: Option<String>,
    pub task: String,
    /// The officer (account name) who should do it.
    pub owner: String,
    pub due_ms: i64,
}

pub fn add_follow_up<T: Transactable>(tx: &mut T, f: &NewFollowUp) -> Result<String, RecordError> {
    if f.task.trim().is_empty() {
        return Err(RecordError::Invalid {
            field: "task",
            reason: "must not be empty".into(),
        });
    }
    let follow_ups = root_map(tx, "follow_ups")?;
    let key = uuid::Uuid::new_v4().to_string();
    let obj = tx.put_object(&follow_ups, key.as_str(), ObjType::Map)?;
    tx.put(&obj, "matter", f.matter.as_deref().unwrap_or(""))?;
    tx.put(&obj, "task", f.task.as_str())?;
    tx.put(&obj, "owner", f.owner.as_str())?;
    tx.put(&obj, "due", ScalarValue::Timestamp(f.due_ms))?;
    tx.put(&obj, "status", FollowUpStatus::Todo.as_str())?;
    tx.put(&obj, "note", "")?;
    Ok(key)
}

/// Any of: reassign, reschedule, change the status, leave a note.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowUpUpdate {
    pub owner: Option<String>,
    pub due_ms: Option<i64>,
    pub status: Option<FollowUpStatus>,
    pub note: Option<String>,
}

pub fn update_follow_up<T: Transactable>(
    tx: &mut T,
    follow_up: &str,
    u: &FollowUpUpdate,
) -> Result<(), RecordError> {
    let obj = entry(tx, "follow_ups", follow_up)?;
    if let Some(o) = &u.owner {
        tx.put(&obj, "owner", o.as_str())?;
    }
    if let Some(d) = u.due_ms {
        tx.put(&obj, "due", ScalarValue::Timestamp(d))?;
    }
    if let Some(s) = u.status {
        tx.put(&obj, "status", s.as_str())?;
    }
    if let Some(n) = &u.note {
        tx.put(&obj, "note", n.as_str())?;
    }
    Ok(())
}

/// A station's review: the state, who and when, and for an approval the heads it approved
/// (so a later change shows as "changed since approval"). A comment is appended, if any.
/// Marks (or unmarks) a visit's notes "for the meeting": staff choose the notes the monthly
/// report shows for the police–community meeting. Kept in `review.for_meeting.<visit>` as
/// `{marked, by, at}`; the entry is updated in place, never removed (an unmark is
/// `marked: false`), so a concurrent mark and unmark merge field by field.
pub fn mark_for_meeting<T: Transactable>(
    tx: &mut T,
    visit: &str,
    marked: bool,
    by: &str,
    at_ms: i64,
) -> Result<(), RecordError> {
    entry(tx, "visits", visit)?;
    let review = root_map(tx, "review")?;
    let marks = match tx.get(&review, "for_meeting")? {
        Some((automerge::Value::Object(ObjType::Map), id)) => id,
        _ => tx.put_object(&review, "for_meeting", ObjType::Map)?,
    };
    let mark = match tx.get(&marks, visit)? {
        Some((automerge::Value::Object(ObjType::Map), id)) => id,
        _ => tx.put_object(&marks, visit, ObjType::Map)?,
    };
    tx.put(&mark, "marked", marked)?;
    tx.put(&mark, "by", by)?;
    tx.put(&mark, "at", ScalarValue::Timestamp(at_ms))?;
    Ok(())
}

pub fn set_review<T: Transactable>(
    tx: &mut T,
    state: ReviewState,
    by: &str,
    at_ms: i64,
    approved_heads: &[automerge::ChangeHash],
    comment: &str,
) -> Result<(), RecordError> {
    let review = root_map(tx, "review")?;
    tx.put(&review, "state", state.as_str())?;
    tx.put(&review, "by", by)?;
    tx.put(&review, "at", ScalarValue::Timestamp(at_ms))?;
    // A fresh list each time: the approval is one value, replaced as a whole.
    let heads = tx.put_object(&review, "approved_heads", ObjType::List)?;
    if state == ReviewState::Approved {
        for (i, h) in approved_heads.iter().enumerate() {
            tx.insert(&heads, i, h.to_string())?;
        }
    }
    if !comment.is_empty() {
        let comments = match tx.get(&review, "comments")? {
            Some((automerge::Value::Object(ObjType::List), id)) => id,
            _ => tx.put_object(&review, "comments", ObjType::List)?,
        };
        let at = tx.length(&comments);
        let item = tx.insert_object(&comments, at, ObjType::Map)?;
        tx.put(&item, "by", by)?;
        tx.put(&item, "at", ScalarValue::Timestamp(at_ms))?;
        tx.put(&item, "text", comment)?;
    }
    Ok(())
}
