//! The backup archive's format: portable, versioned, independent of sled's files or
//! PostgreSQL's. JSON lines: a header, then entries (documents as Automerge bytes in base64,
//! account records, audit entries, provenance rows, actor bindings), a manifest with the
//! counts, and last the SHA-256 of every byte before it. A truncated archive has no
//! checksum line; a changed byte fails the checksum; both are refused before anything is
//! read from them.
//! Owns writing and reading that format over `Write`/`BufRead`. Must not: decide what goes
//! into a backup or where it is restored (that is `backup`).

use std::io::{BufRead, Write};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::accounts::AuditEntry;
use crate::auth::{DeviceId, Record};
use crate::changelog::ProvenanceRow;
use crate::ids::DocumentId;

/// The format's name and version, on the first line.
pub const FORMAT: &str = "fieldsync-backup";
pub const VERSION: u32 = 1;

/// Longest line read back (a document's bytes in base64, with room).
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// What the archive holds and where its point is: checked against the entries on reading.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The storage id of the server it was taken from (a restore makes a new one).
    pub storage_id: String,
    pub created_at_ms: i64,
    /// The change feed's sequence number at the point: every change accepted up to it is in
    /// the archive, and nothing accepted after it.
    pub feed_seq: u64,
    pub documents: usize,
    pub records: usize,
    pub audit_entries: usize,
    pub provenance_rows: usize,
    pub actor_bindings: usize,
}

/// One line of the archive.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    Header {
        format: String,
        version: u32,
    },
    Document {
        id: DocumentId,
        /// The document's heads (hex), checked when it is read back.
        heads: Vec<String>,
        /// The saved document (base64).
        data: String,
    },
    Record(Record),
    Audit(AuditEntry),
    Provenance(ProvenanceRow),
    Actor {
        actor: String,
        device: DeviceId,
    },
    Manifest(Manifest),
    /// The SHA-256 (hex) of every byte before this line.
    Checksum(String),
}

impl Entry {
    pub fn document(id: DocumentId, heads: &[automerge::ChangeHash], bytes: &[u8]) -> Entry {
        Entry::Document {
            id,
            heads: heads.iter().map(|h| h.to_string()).collect(),
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive is not a fieldsync backup (its first line is not a {FORMAT} header)")]
    NotABackup,
    #[error(
        "the archive is version {0}; this fieldsync reads version {VERSION}: use a newer fieldsync"
    )]
    Version(u32),
    #[error("the archive is truncated (no checksum at its end): it was not written to the end; take the backup again")]
    Truncated,
    #[error("the archive is damaged: its checksum does not match its contents (line {0})")]
    Checksum(usize),
    #[error("the archive is damaged: line {0} is not a valid entry ({1})")]
    Line(usize, String),
    #[error("the archive is damaged: {0}")]
    Contents(String),
    #[error("reading or writing the archive: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes entries, hashing as it goes; [`Writer::finish`] adds the checksum line.
pub struct Writer<W: Write> {
    out: W,
    hash: Sha256,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Result<Self, ArchiveError> {
        let mut w = Writer {
            out,
            hash: Sha256::new(),
        };
        w.write(&Entry::Header {
            format: FORMAT.into(),
            version: VERSION,
        })?;
        Ok(w)
    }

    pub fn write(&mut self, entry: &Entry) -> Result<(), ArchiveError> {
        let mut line = serde_json::to_vec(entry).expect("entries serialise");
        line.push(b'\n');
        self.hash.update(&line);
        self.out.write_all(&line)?;
        Ok(())
    }

    /// Writes the checksum line and returns the underlying writer (flushed).
    pub fn finish(mut self) -> Result<W, ArchiveError> {
        let sum = hex::encode(self.hash.finalize_reset());
        let mut line = serde_json::to_vec(&Entry::Checksum(sum)).expect("serialises");
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads every entry of an archive, checking the header, each line and the checksum. The
/// entries reach `each` as they are read; an archive is trusted only once this returns
/// `Ok`, so a caller that writes anything reads the archive twice (check, then copy).
pub fn read(
    input: impl BufRead,
    mut each: impl FnMut(Entry) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let mut hash = Sha256::new();
    let mut lines = 0usize;
    let mut input = input;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = std::io::Read::take(&mut input, MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(if lines == 0 {
                ArchiveError::NotABackup
            } else {
                ArchiveError::Truncated
            });
        }
        lines += 1;
        if line.last() != Some(&b'\n') {
            return Err(if n > MAX_LINE_BYTES {
                ArchiveError::Line(lines, "longer than any entry".into())
            } else {
                ArchiveError::Truncated
            });
        }
        let entry: Entry = match serde_json::from_slice(&line) {
            Ok(e) => e,
            Err(_) if lines == 1 => return Err(ArchiveError::NotABackup),
            Err(e) => return Err(ArchiveError::Line(lines, e.to_string())),
        };
        match (lines, &entry) {
            (1, Entry::Header { format, version }) => {
                if format != FORMAT {
                    return Err(ArchiveError::NotABackup);
                }
                if *version != VERSION {
                    return Err(ArchiveError::Version(*version));
                }
            }
            (1, _) => return Err(ArchiveError::NotABackup),
            (_, Entry::Header { .. }) => {
                return Err(ArchiveError::Line(lines, "a second header".into()))
            }
            (_, Entry::Checksum(sum)) => {
                if hex::encode(hash.finalize_reset()) != *sum {
                    return Err(ArchiveError::Checksum(lines));
                }
                // Nothing may follow the checksum.
                let mut rest = [0u8; 1];
                return match std::io::Read::read(&mut input, &mut rest)? {
                    0 => Ok(()),
                    _ => Err(ArchiveError::Line(
                        lines + 1,
                        "data after the checksum".into(),
                    )),
                };
            }
            _ => {}
        }
        hash.update(&line);
        if !matches!(entry, Entry::Header { .. }) {
            each(entry)?;
        }
    }
}

/// A document entry's bytes.
pub fn document_bytes(data: &str) -> Result<Vec<u8>, ArchiveError> {
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ArchiveError::Contents(format!("a document's bytes are not base64 ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.write(&Entry::Actor {
            actor: "ab".into(),
            device: DeviceId::new("dev-1").unwrap(),
        })
        .unwrap();
        w.write(&Entry::Manifest(Manifest {
            actor_bindings: 1,
            ..Manifest::default()
        }))
        .unwrap();
        w.finish().unwrap()
    }

    fn entries(bytes: &[u8]) -> Result<Vec<Entry>, ArchiveError> {
        let mut out = Vec::new();
        read(bytes, |e| {
            out.push(e);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn an_archive_reads_back_entry_for_entry() {
        let got = entries(&sample()).unwrap();
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Entry::Actor { actor, .. } if actor == "ab"));
        assert!(matches!(&got[1], Entry::Manifest(m) if m.actor_bindings == 1));
    }

    #[test]
    fn a_flipped_byte_or_a_cut_anywhere_is_refused() {
        let good = sample();
        // Every single flipped byte: refused (checksum, a broken line, or no header).
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(entries(&bad).is_err(), "flipping byte {i} went unnoticed");
        }
        // Every cut: refused as truncated (or as no backup at all when nothing is left).
        for len in 0..good.len() {
            match entries(&good[..len]) {
                Err(ArchiveError::Truncated) | Err(ArchiveError::NotABackup) => {}
                other => panic!("cut at {len}: {other:?}"),
            }
        }
        let mut longer = good.clone();
        longer.extend_from_slice(b"{}\n");
        assert!(entries(&longer).is_err());
    }

    #[test]
    fn another_version_or_file_is_named_as_such() {
        assert!(matches!(entries(b"hello\n"), Err(ArchiveError::NotABackup)));
        let v2 = br#"{"header":{"format":"fieldsync-backup","version":2}}
"#;
        assert!(matches!(entries(v2), Err(ArchiveError::Version(2))));
    }
}
