//! `DocumentId`: 16 random bytes (a UUID), written as bs58check the way automerge-repo does,
//! with the URL form `automerge:<id>`.

use std::fmt;
use std::str::FromStr;

/// The id of one Automerge document (one household, one catalog...).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocumentId([u8; 16]);

/// Why a string is not a document id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DocumentIdError {
    #[error("document id is not valid bs58check: {0}")]
    Encoding(String),
    #[error("document id must decode to 16 bytes, got {0}")]
    Length(usize),
}

const URL_PREFIX: &str = "automerge:";

impl DocumentId {
    /// A fresh random id (a v4 UUID, as automerge-repo makes them).
    pub fn random() -> Self {
        Self(*uuid::Uuid::new_v4().as_bytes())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// `automerge:<bs58check>`, the form apps pass around.
    pub fn to_url(&self) -> String {
        format!("{URL_PREFIX}{self}")
    }

    /// Accepts both the bare id and the `automerge:` URL (any `#heads` suffix is ignored).
    pub fn parse_url_or_id(input: &str) -> Result<Self, DocumentIdError> {
        let bare = input.strip_prefix(URL_PREFIX).unwrap_or(input);
        let bare = bare.split('#').next().unwrap_or(bare);
        bare.parse()
    }
}

impl FromStr for DocumentId {
    type Err = DocumentIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s)
            .with_check(None)
            .into_vec()
            .map_err(|e| DocumentIdError::Encoding(e.to_string()))?;
        let arr: [u8; 16] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| DocumentIdError::Length(bytes.len()))?;
        Ok(Self(arr))
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).with_check().into_string())
    }
}

impl fmt::Debug for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocumentId({self})")
    }
}

impl serde::Serialize for DocumentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DocumentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_url_or_id(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text_and_url() {
        let id = DocumentId::random();
        assert_eq!(id.to_string().parse::<DocumentId>().unwrap(), id);
        assert_eq!(DocumentId::parse_url_or_id(&id.to_url()).unwrap(), id);
    }

    #[test]
    fn rejects_a_bad_checksum_and_wrong_length() {
        let id = DocumentId::random().to_string();
        let mut broken = id.clone();
        let last = broken.pop().unwrap();
        broken.push(if last == '2' { '3' } else { '2' });
        assert!(broken.parse::<DocumentId>().is_err());
        let short = bs58::encode([1u8; 8]).with_check().into_string();
        assert_eq!(short.parse::<DocumentId>(), Err(DocumentIdError::Length(8)));
    }

    #[test]
    fn decodes_an_id_made_by_the_js_client() {
        // From tests/fixtures/js-frames/03-client-sync.cbor: made by the JS `repo.create()`.
        let id = DocumentId::parse_url_or_id("automerge:2wHM8Pw46zbd2uzX3h3hX9Sy1t5P").unwrap();
        assert_eq!(id.as_bytes().len(), 16);
    }
}
