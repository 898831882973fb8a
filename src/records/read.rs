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

/// The fields of one map, read in one pass: `map_range` visits each key once, and only a
/// key flagged as contested is looked up again for its other values. Reading a visit
/// field by field cost a seek through the document's operations per field, and that made
/// summarising and validating households the largest part of accepting a change.
pub(crate) struct Fields {
    /// By key, in key order (as `map_range` yields them).
    fields: Vec<Field>,
}

struct Field {
    key: String,
    /// The value `get` returns.
    winner: (Value<'static>, ObjId),
    /// Every concurrent value (as `get_all` returns them), only when there are several.
    all: Option<Vec<(Value<'static>, ObjId)>>,
}

impl Fields {
    pub(crate) fn of<R: ReadDoc>(doc: &R, obj: &ObjId) -> Fields {
        let fields = doc
            .map_range(obj, ..)
            .map(|item| {
                let all = item.conflict.then(|| {
                    doc.get_all(obj, item.key.as_ref())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(v, id)| (v.into_owned(), id))
                        .collect()
                });
                Field {
                    key: item.key.to_string(),
                    winner: (item.value.clone().into_value(), item.id()),
                    all,
                }
            })
            .collect();
        Fields { fields }
    }

    fn field(&self, key: &str) -> Option<&Field> {
        self.fields
            .binary_search_by(|f| f.key.as_str().cmp(key))
            .ok()
            .map(|i| &self.fields[i])
    }

    /// The winning value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&(Value<'static>, ObjId)> {
        self.field(key).map(|f| &f.winner)
    }

    /// Every concurrent value of `key` (empty when it is absent).
    pub(crate) fn all(&self, key: &str) -> &[(Value<'static>, ObjId)] {
        match self.field(key) {
            Some(Field { all: Some(all), .. }) => all,
            Some(f) => std::slice::from_ref(&f.winner),
            None => &[],
        }
    }

    /// The keys, in order, with the winning value.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &(Value<'static>, ObjId))> {
        self.fields.iter().map(|f| (f.key.as_str(), &f.winner))
    }

    /// The winning value of a string field (text or scalar string).
    pub(crate) fn string<R: ReadDoc>(&self, doc: &R, key: &str) -> Option<String> {
        let (v, id) = self.get(key)?;
        value_to_string(doc, v.clone(), id)
    }

    /// The map object at `key`, if it is one.
    pub(crate) fn map(&self, key: &str) -> Option<ObjId> {
        match self.get(key) {
            Some((Value::Object(ObjType::Map), id)) => Some(id.clone()),
            _ => None,
        }
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
    // One pass over the address map: a lookup per part seeks through the operations each
    // time (the label is computed for every accepted change).
    let address = map_at(doc, &ROOT, "address").map(|a| Fields::of(doc, &a));
    let part = |k: &str| {
        address
            .as_ref()
            .and_then(|a| a.string(doc, k))
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

/// The visits staff marked for the police–community meeting (`review.for_meeting.<visit>`
/// with `marked: true`), sorted.
pub fn meeting_marks<R: ReadDoc>(doc: &R) -> Vec<String> {
    let Some(marks) = map_at(doc, &ROOT, "review").and_then(|r| map_at(doc, &r, "for_meeting"))
    else {
        return Vec::new();
    };
    let mut out: Vec<String> = doc
        .keys(&marks)
        .filter(|k| {
            map_at(doc, &marks, k).is_some_and(|m| {
                matches!(
                    doc.get(&m, "marked"),
                    Ok(Some((automerge::Value::Scalar(v), _)))
                        if matches!(v.as_ref(), automerge::ScalarValue::Boolean(true))
                )
            })
        })
        .collect();
    out.sort();
    out
}

/// The address as a key for spotting one address registered twice: street and house
/// number, normalised (see [`normalise_address`]). Empty when the record has neither.
pub fn address_key<R: ReadDoc>(doc: &R) -> String {
    let address = map_at(doc, &ROOT, "address").map(|a| Fields::of(doc, &a));
    let part = |k: &str| {
        address
            .as_ref()
            .and_then(|a| a.string(doc, k))
            .unwrap_or_default()
    };
    normalise_address(&format!("{} {}", part("street"), part("house_no")))
}

/// How two officers may write one address differently, made the same: full-width letters
/// and digits as ASCII, lower case, no spaces or punctuation, no 號 or "No.", and common
/// English street words and their abbreviations (Rd./Road, St./Street, Sec./Section,
/// Ln./Lane, Aly./Alley, S./South...) as one form. "林森南路12號", "林森南路 １２ 號" and
/// "林森南路 No. 12" give the same key.
pub fn normalise_address(address: &str) -> String {
    let half: String = address
        .chars()
        .map(|c| match c {
            // Full-width ASCII (！ to ～) and the ideographic space.
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' => ' ',
            _ => c,
        })
        .flat_map(char::to_lowercase)
        .collect();
    let mut words = Vec::new();
    for raw in half.split(|c: char| c.is_whitespace() || c == ',' || c == '.' || c == '#') {
        let word = match raw {
            "" | "no" | "號" => continue,
            "rd" | "road" => "road",
            "st" | "street" => "street",
            "sec" | "section" => "section",
            "ln" | "lane" => "lane",
            "aly" | "alley" => "alley",
            "blvd" | "boulevard" => "boulevard",
            "ave" | "avenue" => "avenue",
            "s" | "south" => "south",
            "n" | "north" => "north",
            "e" | "east" => "east",
            "w" | "west" => "west",
            other => other,
        };
        words.push(word.replace('號', ""));
    }
    words.concat()
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

#[cfg(test)]
mod tests {
    use super::normalise_address;

    #[test]
    fn one_address_written_several_ways_has_one_key() {
        let key = normalise_address("林森南路12號");
        for same in [
            "林森南路 12 號",
            "林森南路 １２ 號",
            "林森南路　12號",
            "林森南路 No. 12",
            "林森南路12",
        ] {
            assert_eq!(normalise_address(same), key, "{same}");
        }
        assert_eq!(
            normalise_address("Linsen S. Rd. No. 12"),
            normalise_address("linsen south road 12")
        );
        assert_ne!(
            normalise_address("林森南路12號"),
            normalise_address("林森南路14號")
        );
        assert_ne!(
            normalise_address("林森南路12號"),
            normalise_address("林森北路12號")
        );
        assert_eq!(normalise_address(" "), "");
    }
}
