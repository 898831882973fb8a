//! The household schema's vocabulary (every enum of `proto-docs/data-model.md`) and the
//! validation that decides whether an arriving document conforms. Validation never changes
//! or drops anything: it returns reasons, and the server keeps a non-conforming document
//! but quarantines it. Strings are accepted as Automerge text or scalar strings, and every
//! concurrent value of a field is checked. Must not do I/O.

use automerge::{ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::read::Fields;
use super::SCHEMA_VERSION;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }
        impl $name {
            /// Every value, in the documented order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
            /// The accepted spellings, for error messages.
            pub fn choices() -> String {
                [$($text),+].join(" | ")
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!("`{s}` is not one of {}", $name::choices()))
                })
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
string_enum!(
    /// What a resident raised.
    MatterKind { Consultation => "consultation", Complaint => "complaint", Tip => "tip",
                 Dispute => "dispute", Help => "help", Suggestion => "suggestion",
                 Hazard => "hazard" }
);
string_enum!(
    /// How urgent a matter is.
    Risk { Red => "red", Yellow => "yellow", Blue => "blue" }
);
string_enum!(
    /// Where a matter stands; `resolved` and `closed` are the closed states.
    MatterStatus { New => "new", InProgress => "in_progress", Mediated => "mediated",
                   Referred => "referred", Resolved => "resolved", Closed => "closed" }
);
string_enum!(
    /// Where a follow-up stands.
    FollowUpStatus { Todo => "todo", Done => "done", Cancelled => "cancelled" }
);
string_enum!(
    /// The station's review of a household record.
    ReviewState { Received => "received", HasIssues => "has_issues", Approved => "approved",
                  Rejected => "rejected" }
);

impl MatterStatus {
    /// Open matters still need someone's attention.
    pub fn is_open(self) -> bool {
        !matches!(self, MatterStatus::Resolved | MatterStatus::Closed)
    }
}

/// Why a document does not conform; empty means it conforms. Each reason names the field
/// by its dotted path (`visits.<id>.outcome`) and says what was expected.
pub fn validate<R: ReadDoc>(doc: &R) -> Vec<String> {
    let mut v = Validator {
        doc,
        reasons: Vec::new(),
    };
    v.check();
    v.reasons
}

/// A field's dotted path, formatted only when a reason names it (a conforming document,
/// the common case, formats none).
#[derive(Clone, Copy)]
struct P<'a>(&'a str, &'a str);

impl std::fmt::Display for P<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str(self.1)
        } else {
            write!(f, "{}.{}", self.0, self.1)
        }
    }
}

struct Validator<'a, R> {
    doc: &'a R,
    reasons: Vec<String>,
}

impl<R: ReadDoc> Validator<'_, R> {
    fn fail(&mut self, path: impl std::fmt::Display, why: impl std::fmt::Display) {
        if self.reasons.len() < 50 {
            self.reasons.push(format!("{path}: {why}"));
        }
    }

    fn check(&mut self) {
        let doc = self.doc;
        let root = Fields::of(doc, &ROOT);
        if root.string(doc, "type").as_deref() != Some("household") {
            self.fail("type", "must be \"household\"");
            return;
        }
        match root.get("schema") {
            Some((Value::Scalar(s), _)) if scalar_int(s) == Some(SCHEMA_VERSION) => {}
            _ => self.fail("schema", format!("must be {SCHEMA_VERSION}")),
        }
        for key in ["station", "village"] {
            self.required_string(&root, key, P("", key));
        }
        self.enum_field(
            &root,
            "premises",
            P("", "premises"),
            Premises::parse,
            Premises::choices,
        );
        match root.map("address") {
            Some(a) => {
                let a = Fields::of(doc, &a);
                for k in [
                    "township", "village", "group", "street", "house_no", "landmark",
                ] {
                    self.optional_string(&a, k, P("address", k));
                }
            }
            None => self.fail("address", "must be a map"),
        }
        self.entries(&root, "members", |v, path, m| {
            v.required_string(m, "name", P(path, "name"));
            for k in ["relation", "phone"] {
                v.optional_string(m, k, P(path, k));
            }
        });
        self.entries(&root, "visits", |v, path, m| {
            v.required_string(m, "officer", P(path, "officer"));
            v.timestamp(m, "started_at", P(path, "started_at"), true);
            v.timestamp(m, "ended_at", P(path, "ended_at"), false);
            v.enum_field(
                m,
                "outcome",
                P(path, "outcome"),
                VisitOutcome::parse,
                VisitOutcome::choices,
            );
            v.enum_field(
                m,
                "mode",
                P(path, "mode"),
                VisitMode::parse,
                VisitMode::choices,
            );
            v.optional_string(m, "notes", P(path, "notes"));
            for k in ["security_score", "satisfaction"] {
                v.score(m, k, P(path, k));
            }
        });
        self.entries(&root, "matters", |v, path, m| {
            v.enum_field(
                m,
                "kind",
                P(path, "kind"),
                MatterKind::parse,
                MatterKind::choices,
            );
            v.enum_field(
                m,
                "status",
                P(path, "status"),
                MatterStatus::parse,
                MatterStatus::choices,
            );
            if m.get("risk").is_some() {
                v.enum_field(m, "risk", P(path, "risk"), Risk::parse, Risk::choices);
            }
            v.optional_string(m, "description", P(path, "description"));
        });
        self.entries(&root, "follow_ups", |v, path, m| {
            v.required_string(m, "task", P(path, "task"));
            v.enum_field(
                m,
                "status",
                P(path, "status"),
                FollowUpStatus::parse,
                FollowUpStatus::choices,
            );
            v.timestamp(m, "due", P(path, "due"), false);
        });
        match root.map("review") {
            Some(r) => self.enum_field(
                &Fields::of(doc, &r),
                "state",
                P("review", "state"),
                ReviewState::parse,
                ReviewState::choices,
            ),
            None => self.fail("review", "must be a map"),
        }
    }

    /// `key` of the root must be a map of maps; `each` checks one entry (read once).
    fn entries(&mut self, root: &Fields, key: &str, each: impl Fn(&mut Self, &str, &Fields)) {
        let Some(map) = root.map(key) else {
            self.fail(key, "must be a map");
            return;
        };
        let doc = self.doc;
        for (id, (value, entry)) in Fields::of(doc, &map).iter() {
            if !is_entry_key(id) {
                // Keys end up in URLs and paths (the staff page, the API): anything but a
                // UUID could point somewhere else. Shown escaped, never used.
                self.fail(format!("{key}.{id:?}"), "entry keys must be UUIDs");
                continue;
            }
            let path = format!("{key}.{id}");
            match value {
                Value::Object(ObjType::Map) => each(self, &path, &Fields::of(doc, entry)),
                _ => self.fail(&path, "must be a map"),
            }
        }
    }

    fn strings(&self, obj: &Fields, key: &str) -> Vec<Option<String>> {
        obj.all(key)
            .iter()
            .map(|(v, id)| match v {
                Value::Scalar(s) => match s.as_ref() {
                    ScalarValue::Str(s) => Some(s.to_string()),
                    _ => None,
                },
                Value::Object(ObjType::Text) => self.doc.text(id).ok(),
                Value::Object(_) => None,
            })
            .collect()
    }

    fn required_string(&mut self, obj: &Fields, key: &str, path: P<'_>) {
        let values = self.strings(obj, key);
        if values.is_empty() {
            self.fail(path, "is missing");
        }
        for v in values {
            match v {
                None => self.fail(path, "must be a string"),
                Some(s) if s.trim().is_empty() => self.fail(path, "must not be empty"),
                Some(_) => {}
            }
        }
    }

    fn optional_string(&mut self, obj: &Fields, key: &str, path: P<'_>) {
        // Only the kind of each value: reading a note's whole text to learn it is text cost
        // more than the rest of the check.
        let is_string = |v: &Value| {
            matches!(v, Value::Object(ObjType::Text))
                || matches!(v, Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Str(_)))
        };
        if obj.all(key).iter().any(|(v, _)| !is_string(v)) {
            self.fail(path, "must be a string");
        }
    }

    fn enum_field<T>(
        &mut self,
        obj: &Fields,
        key: &str,
        path: P<'_>,
        parse: fn(&str) -> Option<T>,
        choices: fn() -> String,
    ) {
        let values = self.strings(obj, key);
        if values.is_empty() {
            self.fail(path, format!("is missing; one of {}", choices()));
        }
        for v in values {
            match v {
                Some(s) if parse(&s).is_some() => {}
                Some(s) => self.fail(path, format!("{s:?} is not one of {}", choices())),
                None => self.fail(path, format!("must be a string, one of {}", choices())),
            }
        }
    }

    fn timestamp(&mut self, obj: &Fields, key: &str, path: P<'_>, required: bool) {
        let values = obj.all(key);
        if values.is_empty() && required {
            self.fail(path, "is missing; a timestamp (ms since the epoch)");
        }
        for (v, _) in values {
            let ok = matches!(v, Value::Scalar(s) if scalar_int(s).is_some());
            if !ok {
                self.fail(path, "must be a timestamp (ms since the epoch)");
            }
        }
    }

    fn score(&mut self, obj: &Fields, key: &str, path: P<'_>) {
        for (v, _) in obj.all(key) {
            match v {
                Value::Scalar(s) if matches!(scalar_int(s), Some(1..=5)) => {}
                _ => self.fail(path, "must be a whole number from 1 to 5"),
            }
        }
    }
}

/// An integer-valued scalar (JS numbers arrive as f64; timestamps as Timestamp).
/// Whether `key` is a valid entry key: a UUID in its hyphenated form (36 characters of hex
/// digits and dashes), as proto-docs/data-model.md asks.
pub fn is_entry_key(key: &str) -> bool {
    key.len() == 36 && uuid::Uuid::try_parse(key).is_ok()
}

pub(crate) fn scalar_int(s: &ScalarValue) -> Option<i64> {
    match s {
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Some(*i),
        ScalarValue::Uint(u) => i64::try_from(*u).ok(),
        ScalarValue::F64(f) if f.fract() == 0.0 && f.is_finite() => Some(*f as i64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{create_household, samples};
    use automerge::transaction::Transactable;
    use automerge::Automerge;

    const V1: &str = "00000000-0000-4000-8000-000000000001";

    #[test]
    fn a_new_household_conforms_and_a_broken_one_says_why() {
        let mut doc = Automerge::new();
        doc.transact(|tx| create_household(tx, &samples::household("1")))
            .unwrap();
        assert_eq!(validate(&doc), Vec::<String>::new());
        doc.transact(|tx| {
            let visits = tx.get(ROOT, "visits")?.unwrap().1;
            let v = tx.put_object(&visits, V1, ObjType::Map)?;
            tx.put(&v, "officer", "amy")?;
            tx.put(&v, "outcome", "partyy")?;
            tx.put(&v, "security_score", 9)?;
            tx.put(ROOT, "premises", 3)?;
            Ok::<_, automerge::AutomergeError>(())
        })
        .unwrap();
        let reasons = validate(&doc);
        assert!(
            reasons.iter().any(|r| r.starts_with(
                "visits.00000000-0000-4000-8000-000000000001.outcome: \"partyy\" is not one of met"
            )),
            "{reasons:?}"
        );
        assert!(reasons.iter().any(
            |r| r.starts_with("visits.00000000-0000-4000-8000-000000000001.started_at: is missing")
        ));
        assert!(reasons
            .iter()
            .any(|r| r.starts_with("visits.00000000-0000-4000-8000-000000000001.security_score")));
        assert!(reasons
            .iter()
            .any(|r| r.starts_with("premises: must be a string")));
    }

    /// Fields are read in one pass per map; a contested field is still checked in every
    /// concurrent value, whichever wins.
    #[test]
    fn every_concurrent_value_is_checked_not_only_the_winner() {
        let mut base = Automerge::new();
        base.transact(|tx| create_household(tx, &samples::household("1")))
            .unwrap();
        let mut amy = base.fork();
        let mut ben = base.fork();
        amy.transact(|tx| tx.put(ROOT, "premises", "shop")).unwrap();
        ben.transact(|tx| tx.put(ROOT, "premises", "castle"))
            .unwrap();
        amy.merge(&mut ben).unwrap();
        assert_eq!(amy.get_all(ROOT, "premises").unwrap().len(), 2);
        let reasons = validate(&amy);
        assert_eq!(
            reasons.len(),
            1,
            "only the contested field is reported: {reasons:?}"
        );
        assert!(
            reasons[0].starts_with("premises: \"castle\" is not one of"),
            "{reasons:?}"
        );
        let summary = crate::records::summarise(
            &amy,
            &crate::records::Attribution::new(&amy, Default::default()),
        );
        let mut premises = summary.premises.clone();
        premises.sort();
        assert_eq!(premises, vec!["castle", "shop"]);
        assert_eq!(summary.conflicts, 1);
    }

    #[test]
    fn entry_keys_that_are_not_uuids_quarantine_the_household() {
        let mut doc = Automerge::new();
        doc.transact(|tx| create_household(tx, &samples::household("1")))
            .unwrap();
        doc.transact(|tx| {
            let f = tx.get(ROOT, "follow_ups")?.unwrap().1;
            let e = tx.put_object(&f, "x/../../../other/follow-ups/1", ObjType::Map)?;
            tx.put(&e, "task", "call back")?;
            Ok::<_, automerge::AutomergeError>(())
        })
        .unwrap();
        let reasons = validate(&doc);
        assert_eq!(
            reasons,
            vec!["follow_ups.\"x/../../../other/follow-ups/1\": entry keys must be UUIDs"]
        );
        assert!(is_entry_key("0b7c4e7e-3f3a-4c55-9d7e-5a1f7c0e2b11"));
        assert!(!is_entry_key("0b7c4e7e3f3a4c559d7e5a1f7c0e2b11"));
        assert!(!is_entry_key("{0b7c4e7e-3f3a-4c55-9d7e-5a1f7c0e2b11}"));
    }

    #[test]
    fn enums_round_trip_and_list_their_choices() {
        for k in MatterKind::ALL {
            assert_eq!(MatterKind::parse(k.as_str()), Some(*k));
        }
        assert!(FollowUpStatus::choices().contains("todo | done"));
        let s: ReviewState = serde_json::from_str("\"approved\"").unwrap();
        assert_eq!(s, ReviewState::Approved);
        assert!(serde_json::from_str::<ReviewState>("\"ok\"").is_err());
    }
}
