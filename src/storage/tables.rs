//! Small keyed sled tables beside the document chunks, for the sled backends of the layers
//! above (the account directory and audit log, the change log, the projection): they choose
//! keys and encode values (JSON); this file only stores bytes, with the version byte, and
//! gives ordered writes (the hot path), atomic batches within one table and transactions
//! across tables (rare writes). Must not interpret what it stores.

use super::{unversioned, versioned, Result, Store};

/// The tables; each is one sled tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// The directory: stations, villages, users, devices, enrolment codes, sessions,
    /// household registrations (keys `kind/...`).
    Accounts,
    /// One row per accepted change, keyed doc(16) | seq(8 BE): a document's history in order.
    Provenance,
    /// The change feed: seq(8 BE) -> doc(16) | change hash(32).
    Changes,
    /// Automerge actor id -> the device it is bound to.
    Actors,
    /// Admin audit log: seq(8 BE) -> entry.
    Audit,
    /// The staff projection of household documents (rebuildable from the documents and
    /// the provenance rows; keys chosen by `projection`).
    Projection,
}

impl Table {
    pub(super) const ALL: [Table; 6] = [
        Table::Accounts,
        Table::Provenance,
        Table::Changes,
        Table::Actors,
        Table::Audit,
        Table::Projection,
    ];

    pub(super) fn tree_name(self) -> &'static str {
        match self {
            Table::Accounts => "accounts",
            Table::Provenance => "provenance",
            Table::Changes => "changes",
            Table::Actors => "actors",
            Table::Audit => "audit",
            Table::Projection => "projection",
        }
    }
}

/// One write of a batch: `Some` puts, `None` removes.
pub type TableWrite = (Vec<u8>, Option<Vec<u8>>);

impl Store {
    fn tree(&self, t: Table) -> &sled::Tree {
        &self.inner.tables[Table::ALL.iter().position(|x| *x == t).expect("listed")]
    }

    pub fn table_get_blocking(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.tree(t).get(key)? {
            Some(v) => Ok(Some(unversioned(&v)?.to_vec())),
            None => Ok(None),
        }
    }

    /// Every row whose key starts with `prefix`, in key order.
    pub fn table_scan_blocking(&self, t: Table, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.tree(t).scan_prefix(prefix) {
            let (k, v) = item?;
            out.push((k.to_vec(), unversioned(&v)?.to_vec()));
        }
        Ok(out)
    }

    /// Calls `each` for every row whose key starts with `prefix` and is after `after` (if
    /// given), in key order, one at a time (memory stays flat however many rows match),
    /// until `each` returns `false`.
    pub fn table_for_each_blocking(
        &self,
        t: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        mut each: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let iter = match after {
            Some(a) if a >= prefix => self
                .tree(t)
                .range::<&[u8], _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            _ => self.tree(t).range::<&[u8], _>(prefix..),
        };
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || !each(&k, unversioned(&v)?) {
                break;
            }
        }
        Ok(())
    }

    /// Removes every row of the table (a projection about to be rebuilt).
    pub fn table_clear_blocking(&self, t: Table) -> Result<()> {
        self.tree(t).clear()?;
        Ok(())
    }

    /// Up to `limit` rows with keys strictly after `after` (from the start if `None`).
    pub fn table_page_blocking(
        &self,
        t: Table,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let iter = match after {
            Some(a) => self
                .tree(t)
                .range::<&[u8], _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.tree(t).iter(),
        };
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), unversioned(&v)?.to_vec()));
        }
        Ok(out)
    }

    /// Applies every write atomically (all or none after a crash). Not durable until
    /// [`Store::flush`]. sled makes a batch atomic by writing and syncing its log buffer
    /// before and after it, so keep this for rare writes (accounts, administration) and use
    /// [`Store::table_write_in_order_blocking`] on the path of every accepted change.
    pub fn table_write_blocking(&self, t: Table, writes: Vec<TableWrite>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, versioned(&v)),
                None => batch.remove(k),
            }
        }
        self.tree(t).apply_batch(batch)?;
        Ok(())
    }

    /// Applies the writes one after another: each is atomic, the sequence is not, but its
    /// order holds across a crash. sled appends every write to one log and recovers the log
    /// up to its first torn message, so after a crash the store holds the writes made before
    /// some point and none after it (also across tables and [`Store::put_change_blocking`]).
    /// A caller whose sequence must be all-or-nothing writes a marker first (the unsettled
    /// mark) and repairs what a marked prefix left behind on start-up. Not durable until
    /// [`Store::flush`]; costs no log write of its own, where an atomic batch costs two
    /// (measured with `examples/loadgen.rs`: six log syncs per accepted change came from
    /// batches, and dropping them took a third off the server's CPU).
    pub fn table_write_in_order_blocking(&self, t: Table, writes: Vec<TableWrite>) -> Result<()> {
        let tree = self.tree(t);
        for (k, v) in writes {
            match v {
                Some(v) => {
                    tree.insert(k, versioned(&v))?;
                }
                None => {
                    tree.remove(k)?;
                }
            }
        }
        Ok(())
    }

    /// Applies writes to several tables as one unit (all or none after a crash), in one
    /// sled transaction. Like [`Store::table_write_blocking`], for rare writes.
    pub fn tables_write_blocking(&self, writes: Vec<(Table, TableWrite)>) -> Result<()> {
        use sled::Transactional;
        let tables: Vec<Table> = Table::ALL
            .iter()
            .copied()
            .filter(|t| writes.iter().any(|(w, _)| w == t))
            .collect();
        let trees: Vec<&sled::Tree> = tables.iter().map(|t| self.tree(*t)).collect();
        let writes: Vec<(usize, Vec<u8>, Option<Vec<u8>>)> = writes
            .into_iter()
            .map(|(t, (k, v))| {
                let i = tables.iter().position(|x| *x == t).expect("listed");
                (i, k, v.map(|v| versioned(&v)))
            })
            .collect();
        trees[..]
            .transaction(|views| {
                for (i, k, v) in &writes {
                    match v {
                        Some(v) => views[*i].insert(k.as_slice(), v.as_slice())?,
                        None => views[*i].remove(k.as_slice())?,
                    };
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(e) => super::StorageError::from(e),
                sled::transaction::TransactionError::Abort(()) => {
                    super::StorageError::Io("a table transaction aborted".into())
                }
            })
    }

    /// Stores `value` under `key` unless a value is there; returns the value that was there.
    pub fn table_insert_if_absent_blocking(
        &self,
        t: Table,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        match self
            .tree(t)
            .compare_and_swap(key, None as Option<&[u8]>, Some(versioned(value)))?
        {
            Ok(()) => Ok(None),
            Err(e) => match e.current {
                Some(v) => Ok(Some(unversioned(&v)?.to_vec())),
                None => Ok(None),
            },
        }
    }

    /// A new server sequence number: strictly greater than every one handed out before,
    /// also across restarts (gaps are possible after a crash).
    pub fn next_sequence_blocking(&self) -> Result<u64> {
        Ok(self.inner.db.generate_id()?)
    }

    /// Makes every sequence number handed out from now on greater than `past` (data copied
    /// in from another store keeps its numbers). sled's generator can only be stepped, one
    /// atomic increment at a time: about a million a second.
    pub fn advance_sequence_blocking(&self, past: u64) -> Result<()> {
        while self.inner.db.generate_id()? < past {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::StoreConfig;
    use super::*;

    #[tokio::test]
    async fn batches_scans_pages_and_first_binding_wins() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        s.table_write_blocking(
            Table::Accounts,
            vec![
                (b"user/a".to_vec(), Some(b"1".to_vec())),
                (b"user/b".to_vec(), Some(b"2".to_vec())),
                (b"village/x".to_vec(), Some(b"3".to_vec())),
            ],
        )
        .unwrap();
        let users = s.table_scan_blocking(Table::Accounts, b"user/").unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[1], (b"user/b".to_vec(), b"2".to_vec()));
        let page = s
            .table_page_blocking(Table::Accounts, Some(b"user/a"), 10)
            .unwrap();
        assert_eq!(page.len(), 2);
        assert_eq!(page[0].0, b"user/b");
        s.table_write_blocking(Table::Accounts, vec![(b"user/a".to_vec(), None)])
            .unwrap();
        assert!(s
            .table_get_blocking(Table::Accounts, b"user/a")
            .unwrap()
            .is_none());
        assert_eq!(s.table_get_blocking(Table::Audit, b"user/b").unwrap(), None);

        assert_eq!(
            s.table_insert_if_absent_blocking(Table::Actors, b"actor", b"dev-1")
                .unwrap(),
            None
        );
        assert_eq!(
            s.table_insert_if_absent_blocking(Table::Actors, b"actor", b"dev-2")
                .unwrap(),
            Some(b"dev-1".to_vec())
        );
        let a = s.next_sequence_blocking().unwrap();
        assert!(s.next_sequence_blocking().unwrap() > a);
    }
}
