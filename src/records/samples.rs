//! Sample households and visits with realistic values, shared by unit tests, the integration
//! suite, examples and benchmarks (one definition instead of a copy in each).

use super::{Address, NewHousehold, NewVisit, Premises, VisitMode, VisitOutcome};

/// A home in Linsen village with the given house number.
pub fn household(house_no: &str) -> NewHousehold {
    NewHousehold {
        station: "Zhongzheng Station".into(),
        village: "Linsen".into(),
        address: Address {
            township: "Zhongzheng".into(),
            village: "Linsen".into(),
            group: "3".into(),
            street: "Linsen S. Rd".into(),
            house_no: house_no.into(),
            landmark: String::new(),
        },
        premises: Premises::Home,
    }
}

/// A visit in which `officer` met the resident, with `notes`.
pub fn visit(officer: &str, notes: &str) -> NewVisit {
    NewVisit {
        officer: officer.into(),
        device: format!("{officer}-phone"),
        started_at_ms: 1_790_000_000_000,
        ended_at_ms: 1_790_000_600_000,
        outcome: VisitOutcome::Met,
        mode: VisitMode::InHome,
        people_met: vec!["resident".into()],
        notes: notes.into(),
        publicity: vec!["anti_fraud".into()],
        security_score: Some(4),
        satisfaction: Some(5),
    }
}
