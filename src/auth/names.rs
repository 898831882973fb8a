//! Typed names of the people-and-places model: stations, villages, users and devices. Owns
//! their validation rules (what an operator may type); must not know where they are stored.

use std::fmt;
use std::sync::Arc;

/// Why a name was refused, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Longest name, in characters.
const MAX_NAME_CHARS: usize = 64;

/// Names are what operators type: any script (village names are usually Chinese), but no
/// control characters, no surrounding spaces, and no `,` or `/` (lists and keys use them).
fn check(what: &'static str, value: &str) -> Result<Arc<str>, NameError> {
    let err = |reason| NameError {
        what,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(err("it is empty"));
    }
    if value.trim() != value {
        return Err(err("it starts or ends with a space"));
    }
    if value.chars().count() > MAX_NAME_CHARS {
        return Err(err("it is longer than 64 characters"));
    }
    if value
        .chars()
        .any(|c| c.is_control() || c == ',' || c == '/')
    {
        return Err(err("it contains a control character, ',' or '/'"));
    }
    Ok(Arc::from(value))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(value: &str) -> Result<Self, NameError> {
                check($what, value).map(Self)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(&s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
    };
}

name_type!(
    /// A police station: the boundary nothing crosses.
    StationId,
    "station name"
);
name_type!(
    /// A village (里/村), unique within its station.
    VillageName,
    "village name"
);
name_type!(
    /// An account's sign-in name, unique on the server.
    UserName,
    "user name"
);
name_type!(
    /// A device, named by the server at enrolment (`dev-` and 16 hex digits).
    DeviceId,
    "device id"
);

impl DeviceId {
    /// A new device id from 8 random bytes (randomness comes in as a parameter).
    pub fn from_random(bytes: [u8; 8]) -> Self {
        Self(Arc::from(format!("dev-{}", hex::encode(bytes))))
    }
}

/// What an account may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Syncs the households of the villages assigned to them.
    Officer,
    /// Reads and reviews their station's records.
    Staff,
    /// Manages accounts, villages and devices of their station; reads like staff.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Officer => "officer",
            Role::Staff => "staff",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "officer" => Ok(Role::Officer),
            "staff" => Ok(Role::Staff),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}; use officer, staff or admin"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_any_script_and_refuse_what_breaks_lists() {
        assert_eq!(VillageName::new("大同里").unwrap().as_str(), "大同里");
        assert!(StationId::new("north").is_ok());
        for bad in ["", " north", "a,b", "a/b", "tab\there"] {
            let e = StationId::new(bad).unwrap_err();
            assert_eq!(e.what, "station name");
        }
        assert!(UserName::new(&"x".repeat(65)).is_err());
    }

    #[test]
    fn names_round_trip_through_json() {
        let v = VillageName::new("東村").unwrap();
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, "\"東村\"");
        assert_eq!(serde_json::from_str::<VillageName>(&json).unwrap(), v);
        assert!(serde_json::from_str::<VillageName>("\"a,b\"").is_err());
    }
}
