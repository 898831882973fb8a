//! Typed writes of the household schema (DESIGN.md §2, proto-docs/data-model.md).

use automerge::transaction::Transactable;
use automerge::{ObjType, ScalarValue, ROOT};

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

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant),+ }
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

string_enum!(
    /// What the address is used as.
    Premises { Home => "home", Rental => "rental", Shop => "shop", Business => "business",
               Institution => "institution", Vacant => "vacant" }
);
string_enum!(
    /// How a visit ended.
    VisitOutcome { Met => "met", NobodyHome => "nobody_home", Refused => "refused",
                   Moved => "moved", Vacant => "vacant" }
);
string_enum!(
    /// How the officer talked to the household.
    VisitMode { InHome => "in_home", Doorstep => "doorstep", Phone => "phone" }
);

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
