//! Typed reads of a household, keeping every concurrent value of contested fields.

use automerge::{ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::RecordError;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VisitView {
    pub id: String,
    pub officer: String,
    pub device: String,
    pub started_at_ms: Option<i64>,
    pub outcome: String,
    pub mode: String,
    pub notes: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HouseholdView {
    pub station: String,
    pub village: String,
    pub address_label: String,
    /// Every concurrent value of `premises` (one when there is no conflict).
    pub premises: Vec<String>,
    /// Every concurrent value of `address.landmark`.
    pub landmark: Vec<String>,
    /// Sorted by device start time, then id.
    pub visits: Vec<VisitView>,
}

/// A string field whether stored as Automerge text or as a scalar string; the winning value.
pub(crate) fn string_at<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<String> {
    match doc.get(obj, key).ok().flatten() {
        Some((v, id)) => value_to_string(doc, v, &id),
        None => None,
    }
}

/// Every concurrent value of a string field.
pub(crate) fn strings_at<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Vec<String> {
    doc.get_all(obj, key)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(v, id)| value_to_string(doc, v, &id))
        .collect()
}

fn value_to_string<R: ReadDoc>(doc: &R, v: Value<'_>, id: &ObjId) -> Option<String> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            ScalarValue::Int(i) => Some(i.to_string()),
            ScalarValue::Uint(i) => Some(i.to_string()),
            _ => None,
        },
        Value::Object(ObjType::Text) => doc.text(id).ok(),
        Value::Object(_) => None,
    }
}

pub(crate) fn map_at<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<ObjId> {
    match doc.get(obj, key).ok().flatten() {
        Some((Value::Object(ObjType::Map), id)) => Some(id),
        _ => None,
    }
}

fn timestamp_at<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Option<i64> {
    match doc.get(obj, key).ok().flatten() {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Timestamp(t) | ScalarValue::Int(t) => Some(*t),
            ScalarValue::F64(f) => Some(*f as i64),
            _ => None,
        },
        _ => None,
    }
}

/// "township village group street No. house_no", skipping empty parts.
pub fn address_label<R: ReadDoc>(doc: &R) -> String {
    let address = map_at(doc, &ROOT, "address");
    let part = |k: &str| {
        address
            .as_ref()
            .and_then(|a| string_at(doc, a, k))
            .unwrap_or_default()
    };
    let mut label = Vec::new();
    for k in ["township", "village", "group", "street"] {
        let v = part(k);
        if !v.is_empty() {
            label.push(v);
        }
    }
    let house = part("house_no");
    if !house.is_empty() {
        label.push(format!("No. {house}"));
    }
    label.join(" ")
}

pub fn read_household<R: ReadDoc>(doc: &R) -> Result<HouseholdView, RecordError> {
    if string_at(doc, &ROOT, "type").as_deref() != Some("household") {
        return Err(RecordError::NotAHousehold(
            "`type` is not \"household\"".into(),
        ));
    }
    let address = map_at(doc, &ROOT, "address");
    let mut visits = Vec::new();
    if let Some(vmap) = map_at(doc, &ROOT, "visits") {
        for key in doc.keys(&vmap) {
            let Some(v) = map_at(doc, &vmap, &key) else {
                continue;
            };
            visits.push(VisitView {
                officer: string_at(doc, &v, "officer").unwrap_or_default(),
                device: string_at(doc, &v, "device").unwrap_or_default(),
                started_at_ms: timestamp_at(doc, &v, "started_at"),
                outcome: string_at(doc, &v, "outcome").unwrap_or_default(),
                mode: string_at(doc, &v, "mode").unwrap_or_default(),
                notes: string_at(doc, &v, "notes").unwrap_or_default(),
                id: key,
            });
        }
    }
    visits.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
    Ok(HouseholdView {
        station: string_at(doc, &ROOT, "station").unwrap_or_default(),
        village: string_at(doc, &ROOT, "village").unwrap_or_default(),
        address_label: address_label(doc),
        premises: strings_at(doc, &ROOT, "premises"),
        landmark: address
            .as_ref()
            .map(|a| strings_at(doc, a, "landmark"))
            .unwrap_or_default(),
        visits,
    })
}

/// The station and village a household document names, if it is a household at all: what
/// the server checks before registering a newly uploaded document.
pub fn household_scope<R: ReadDoc>(doc: &R) -> Option<(String, String)> {
    if string_at(doc, &ROOT, "type").as_deref() != Some("household") {
        return None;
    }
    Some((
        string_at(doc, &ROOT, "station")?,
        string_at(doc, &ROOT, "village")?,
    ))
}
