//! Where the account directory and the admin audit log are kept, behind one interface with
//! a backend per engine: the sled layout (JSON records keyed `kind/...`, audit entries keyed
//! by sequence) here, the PostgreSQL one in `accounts::postgres`. A change to the
//! directory and its audit entry are one unit: after a crash both or neither. One
//! conformance suite (`tests`) runs against both. Must not: decide anything about the
//! records (that is `auth::directory`).

use super::admin::AuditEntry;
use crate::auth::directory::{Op, RecordKey};
use crate::auth::Record;
use crate::ids::Timestamp;
use crate::storage::documents::Durable;
use crate::storage::{StorageError, Store, Table, TableWrite};

/// An audit entry before the store numbers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAudit {
    pub at: Timestamp,
    pub operator: String,
    pub action: String,
    pub detail: String,
}

/// Every call but [`DirectoryStore::durable`] blocks (call it on a blocking thread).
pub trait DirectoryStore: Send + Sync + 'static {
    /// Every record of the directory.
    fn load(&self) -> Result<Vec<Record>, StorageError>;

    /// One record, if it is stored.
    fn record(&self, key: &RecordKey) -> Result<Option<Record>, StorageError>;

    /// Whether other processes may change the directory in this store (several nodes on
    /// one database): then a record missing from memory may be looked up here.
    fn shared(&self) -> bool {
        false
    }

    /// Stores `record` unless a record with its key is stored (another node registered the
    /// same household a moment ago); returns the stored one then. Waits for a concurrent
    /// writer of the same key to finish.
    fn insert_if_absent(&self, record: &Record) -> Result<Option<Record>, StorageError> {
        if let Some(existing) = self.record(&record.key())? {
            return Ok(Some(existing));
        }
        self.commit(&[Op::Put(record.clone())], None)?;
        Ok(None)
    }

    /// Applies `ops` and appends `audit` (numbered after every earlier entry) as one unit.
    /// Durable once [`DirectoryStore::durable`] resolves.
    fn commit(&self, ops: &[Op], audit: Option<&NewAudit>) -> Result<(), StorageError>;

    /// The latest `limit` audit entries, oldest first.
    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StorageError>;

    /// Stores entries copied from another backend under their own numbers (an entry
    /// already stored is left as it is); entries appended later are numbered after them.
    fn import_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError>;

    /// Resolves once everything committed before the call is durable.
    fn durable(&self) -> Durable;
}

/// The sled layout: [`Table::Accounts`] (record key -> record JSON) and [`Table::Audit`]
/// (sequence, 8 bytes big-endian -> entry JSON), written in one sled transaction.
pub struct SledDirectory {
    store: Store,
}

impl SledDirectory {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("{what}: {e}"))
}

impl DirectoryStore for SledDirectory {
    fn load(&self) -> Result<Vec<Record>, StorageError> {
        self.store
            .table_scan_blocking(Table::Accounts, b"")?
            .into_iter()
            .map(|(key, value)| {
                Record::from_json(&value).map_err(|e| {
                    corrupt(
                        &format!(
                            "account record {} is unreadable",
                            String::from_utf8_lossy(&key)
                        ),
                        e,
                    )
                })
            })
            .collect()
    }

    fn record(&self, key: &RecordKey) -> Result<Option<Record>, StorageError> {
        self.store
            .table_get_blocking(Table::Accounts, &key.encode())?
            .map(|v| Record::from_json(&v).map_err(|e| corrupt("account record", e)))
            .transpose()
    }

    fn commit(&self, ops: &[Op], audit: Option<&NewAudit>) -> Result<(), StorageError> {
        let mut writes: Vec<(Table, TableWrite)> = ops
            .iter()
            .map(|op| match op {
                Op::Put(r) => (Table::Accounts, (r.key().encode(), Some(r.to_json()))),
                Op::Remove(k) => (Table::Accounts, (k.encode(), None)),
            })
            .collect();
        if let Some(a) = audit {
            let seq = self.store.next_sequence_blocking()?;
            let entry = AuditEntry {
                seq,
                at: a.at,
                operator: a.operator.clone(),
                action: a.action.clone(),
                detail: a.detail.clone(),
            };
            writes.push((
                Table::Audit,
                (
                    seq.to_be_bytes().to_vec(),
                    Some(serde_json::to_vec(&entry).expect("audit entries serialise")),
                ),
            ));
        }
        if writes.is_empty() {
            return Ok(());
        }
        self.store.tables_write_blocking(writes)
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StorageError> {
        let rows = self.store.table_scan_blocking(Table::Audit, b"")?;
        let skip = rows.len().saturating_sub(limit);
        rows.into_iter()
            .skip(skip)
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| corrupt("audit entry", e)))
            .collect()
    }

    fn import_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError> {
        let Some(last) = entries.iter().map(|e| e.seq).max() else {
            return Ok(());
        };
        let mut writes = Vec::new();
        for e in entries {
            let key = e.seq.to_be_bytes().to_vec();
            if self.store.table_get_blocking(Table::Audit, &key)?.is_none() {
                let json = serde_json::to_vec(e).expect("audit entries serialise");
                writes.push((Table::Audit, (key, Some(json))));
            }
        }
        if !writes.is_empty() {
            self.store.tables_write_blocking(writes)?;
        }
        self.store.advance_sequence_blocking(last)
    }

    fn durable(&self) -> Durable {
        Box::pin(self.store.flush())
    }
}

/// The conformance suite, against every backend.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::directory::{RecordKey, Station};
    use crate::auth::StationId;

    fn station(name: &str) -> Record {
        Record::Station(Station {
            name: StationId::new(name).unwrap(),
            created_at: Timestamp::from_millis(1_790_000_000_000),
        })
    }

    fn audit(n: u64) -> NewAudit {
        NewAudit {
            at: Timestamp::from_millis(1_790_000_000_000 + n),
            operator: "cli:root".into(),
            action: format!("station add s{n}"),
            detail: String::new(),
        }
    }

    pub(crate) fn run_all(s: &dyn DirectoryStore) {
        assert!(s.load().unwrap().is_empty());
        assert!(s.audit(10).unwrap().is_empty());
        s.commit(
            &[Op::Put(station("north")), Op::Put(station("south"))],
            Some(&audit(1)),
        )
        .unwrap();
        s.commit(&[Op::Put(station("east"))], None).unwrap();
        s.commit(
            &[Op::Remove(RecordKey::Station(
                StationId::new("south").unwrap(),
            ))],
            Some(&audit(2)),
        )
        .unwrap();
        // Putting a record again replaces it; removing a missing one is harmless.
        s.commit(
            &[
                Op::Put(station("north")),
                Op::Remove(RecordKey::Station(StationId::new("nowhere").unwrap())),
            ],
            Some(&audit(3)),
        )
        .unwrap();
        let mut names: Vec<String> = s
            .load()
            .unwrap()
            .into_iter()
            .map(|r| match r {
                Record::Station(st) => st.name.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        names.sort();
        assert_eq!(names, vec!["east", "north"]);
        let north = RecordKey::Station(StationId::new("north").unwrap());
        assert_eq!(s.record(&north).unwrap(), Some(station("north")));
        let south = RecordKey::Station(StationId::new("south").unwrap());
        assert_eq!(s.record(&south).unwrap(), None);
        // The first registration of a key stays; a second gets the first back.
        assert_eq!(s.insert_if_absent(&station("west")).unwrap(), None);
        assert_eq!(
            s.insert_if_absent(&station("west")).unwrap(),
            Some(station("west"))
        );
        s.commit(
            &[Op::Remove(RecordKey::Station(
                StationId::new("west").unwrap(),
            ))],
            None,
        )
        .unwrap();

        let all = s.audit(10).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{all:?}");
        assert_eq!(all[0].action, "station add s1");
        assert_eq!(all[2].at, audit(3).at);
        assert_eq!(all[2].operator, "cli:root");
        let last = s.audit(2).unwrap();
        assert_eq!(last, all[1..].to_vec(), "the latest two, oldest first");

        // Imported entries keep their numbers (twice is once); later ones come after.
        let far = all[2].seq + 1_000;
        let imported: Vec<AuditEntry> = [far - 1, far]
            .into_iter()
            .map(|seq| AuditEntry {
                seq,
                at: Timestamp::from_millis(1_790_000_000_000 + seq),
                operator: "cli:moved".into(),
                action: format!("imported {seq}"),
                detail: "from the other backend".into(),
            })
            .collect();
        s.import_audit(&imported).unwrap();
        s.import_audit(&imported).unwrap();
        s.commit(&[], Some(&audit(4))).unwrap();
        let now = s.audit(10).unwrap();
        assert_eq!(now.len(), 6, "{now:?}");
        assert_eq!(now[3..5].to_vec(), imported);
        assert!(
            now[5].seq > far && now[5].action == "station add s4",
            "{now:?}"
        );
    }

    #[test]
    fn the_sled_directory_conforms() {
        crate::storage::on_temp_store(|store| run_all(&SledDirectory::new(store)));
    }
}
