//! `fieldsync migrate`: copies a station's data from one backend into another (embedded
//! sled to PostgreSQL and back): every document, account record, audit entry, provenance
//! row and actor binding, and the server's storage id (so devices' sync states stay true).
//! It then verifies the copy (every document's heads, the counts of each kind) and rebuilds
//! the target's staff projection from what it copied.
//!
//! Safe to re-run: everything is copied by key (documents as a snapshot named by its
//! heads, rows under their own sequence numbers), a document already there with the same
//! heads is skipped, and the target's account records are made equal to the source's. A
//! target that holds another server's data (another storage id) is refused. Sync states
//! are not copied: a device's first sync after the move costs one more round trip.
//!
//! Must not: write to the source, or run beside a server using either side (sled refuses a
//! directory in use; for PostgreSQL the operator stops the servers, as the README says).

use std::collections::BTreeSet;

use automerge::ChangeHash;

use crate::accounts::{Accounts, AccountsConfig};
use crate::auth::directory::Op;
use crate::changelog::ChangeLog;
use crate::ids::{DocumentId, SystemClock};
use crate::projection::Projection;
use crate::server::backend::{Backend, Place};
use crate::storage::{blocking, snapshot_name, StorageError, StoreConfig};

/// Rows read or written per step.
const PAGE: usize = 1000;

/// What a migration has done so far (for a progress line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Documents copied and verified, of all.
    Documents(usize, usize),
    /// Provenance rows copied so far.
    Provenance(usize),
    /// Households re-projected on the target, of all.
    Reindex(usize, usize),
}

/// What was copied and checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Documents in the source (each now in the target with the same heads).
    pub documents: usize,
    /// Of those, documents the target already had with the same heads (a re-run).
    pub documents_already_there: usize,
    /// Account directory records (stations, villages, users, devices, registrations...).
    pub records: usize,
    /// Records the target had and the source does not, removed.
    pub records_removed: usize,
    pub audit_entries: usize,
    pub provenance_rows: usize,
    pub actor_bindings: usize,
    /// Households in the rebuilt projection.
    pub households_projected: usize,
}

/// Copies `from` into `to`, verifies, and rebuilds the target's projection.
pub async fn migrate(
    from: &Place,
    to: &Place,
    progress: impl FnMut(Progress) + Send + 'static,
) -> Result<Report, crate::Error> {
    if from == to {
        return Err(crate::Error::Config(
            "--from and --to are the same place; give the target as another data directory or database".into(),
        ));
    }
    let source = open(from, Role::Source).await?;
    let target = open(to, Role::Target).await?;
    let storage_id = source.storage_id().await?;
    let (s, t) = (source.clone(), target.clone());
    let (source_empty, target_empty) =
        blocking(move || Ok::<_, StorageError>((is_empty(&s)?, is_empty(&t)?))).await?;
    if source_empty {
        return Err(crate::Error::Config(format!(
            "{} holds no documents and no accounts; check --from",
            source.describe()
        )));
    }
    if !target_empty {
        let theirs = target.storage_id().await?;
        if theirs != storage_id {
            return Err(crate::Error::Config(format!(
                "{} holds another server's data (storage id {theirs}, the source's is {storage_id}); migrate into an empty data directory or database",
                target.describe()
            )));
        }
        let (s, t) = (source.clone(), target.clone());
        if blocking(move || written_since(&s, &t)).await? {
            return Err(crate::Error::Config(format!(
                "{} has changes made after an earlier migration (a server ran on it); copying again would undo them. Keep serving from it, or migrate into an empty target",
                target.describe()
            )));
        }
    }
    target.adopt_storage_id(&storage_id).await?;
    let (s, t) = (source.clone(), target.clone());
    let (mut report, progress) = tokio::task::spawn_blocking(move || {
        let mut progress = progress;
        copy_blocking(&s, &t, &mut progress).map(|report| (report, progress))
    })
    .await
    .map_err(|e| StorageError::Task(e.to_string()))??;
    report.households_projected = reindex(&target, progress).await?;
    target.documents.durable().await?;
    Ok(report)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Source,
    Target,
}

/// Opens `place` to be written into (by `migrate` or a restore): a PostgreSQL database is
/// taken from every server for the duration (its maintenance lock).
pub(crate) async fn open_target(place: &Place) -> Result<Backend, crate::Error> {
    open(place, Role::Target).await
}

async fn open(place: &Place, role: Role) -> Result<Backend, crate::Error> {
    match place {
        Place::Database(url) => {
            let backend = Backend::connect(url).await?;
            if let crate::server::backend::Engine::Postgres(pg) = &backend.engine {
                pg.lock_for_maintenance("migrate").await?;
            }
            Ok(backend)
        }
        Place::Directory(dir) => {
            crate::server::refuse_postgres_marker(dir)?;
            if role == Role::Source && !crate::server::holds_embedded_data(dir) {
                return Err(crate::Error::Config(format!(
                    "{} holds no fieldsync data; --from takes the --data directory of a server (or a postgres:// URL)",
                    dir.display()
                )));
            }
            crate::storage::prepare_data_dir(dir)?;
            Backend::open_embedded(dir, &StoreConfig::default()).map_err(|e| match e {
                StorageError::Io(m) if m.contains("in use") => crate::Error::Config(format!(
                    "{} is in use by a running fieldsync server; stop it, run migrate, then start the server on the target",
                    dir.display()
                )),
                other => other.into(),
            })
        }
    }
}

/// Whether `target` has accepted changes or admin actions that `source` has not: numbered
/// after the source's last ones.
fn written_since(source: &Backend, target: &Backend) -> Result<bool, StorageError> {
    let last_audit = |b: &Backend| -> Result<u64, StorageError> {
        Ok(b.directory.audit(1)?.first().map_or(0, |e| e.seq))
    };
    Ok(last_provenance(target)?.1 > last_provenance(source)?.1
        || last_audit(target)? > last_audit(source)?)
}

pub(crate) fn is_empty(b: &Backend) -> Result<bool, StorageError> {
    Ok(b.documents.list()?.is_empty() && b.directory.load()?.is_empty())
}

fn copy_blocking(
    source: &Backend,
    target: &Backend,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, crate::Error> {
    let mut report = Report::default();

    // Documents: one snapshot each, named by its heads; then read back and compared.
    let docs = source.documents.list()?;
    report.documents = docs.len();
    for (i, &doc) in docs.iter().enumerate() {
        if copy_document(source, target, doc)? {
            report.documents_already_there += 1;
        }
        progress(Progress::Documents(i + 1, docs.len()));
    }

    // The change log, in server order, a page at a time.
    let mut after = 0;
    loop {
        let (rows, next) = source.changelog.feed(after, PAGE, PAGE, &|_| true)?;
        if rows.is_empty() {
            break;
        }
        target.changelog.import(&rows)?;
        report.provenance_rows += rows.len();
        progress(Progress::Provenance(report.provenance_rows));
        after = next;
    }
    for (actor, device) in source.changelog.actors()? {
        target.changelog.bind_actor(&actor, &device)?;
        report.actor_bindings += 1;
    }

    // Accounts: the target's records become the source's.
    let records = source.directory.load()?;
    report.records = records.len();
    let keep: BTreeSet<Vec<u8>> = records.iter().map(|r| r.key().encode()).collect();
    let stale: Vec<Op> = target
        .directory
        .load()?
        .into_iter()
        .filter(|r| !keep.contains(&r.key().encode()))
        .map(|r| Op::Remove(r.key()))
        .collect();
    report.records_removed = stale.len();
    let puts: Vec<Op> = records.into_iter().map(Op::Put).collect();
    for ops in stale.chunks(PAGE).chain(puts.chunks(PAGE)) {
        target.directory.commit(ops, None)?;
    }
    let audit = source.directory.audit(usize::MAX)?;
    report.audit_entries = audit.len();
    for page in audit.chunks(PAGE) {
        target.directory.import_audit(page)?;
    }
    target.documents.flush()?;

    verify_counts(source, target, &report)?;
    Ok(report)
}

/// Copies one document unless the target has it with the same heads (then `true`), and
/// checks that the target then loads with the source's heads.
fn copy_document(
    source: &Backend,
    target: &Backend,
    doc: DocumentId,
) -> Result<bool, crate::Error> {
    let theirs = source.documents.load(doc)?.hydrate()?;
    let mut heads = theirs.get_heads();
    heads.sort();
    if target.documents.exists(doc)? && target_heads(target, doc)? == heads {
        return Ok(true);
    }
    target
        .documents
        .compact(doc, snapshot_name(&heads), &theirs.save(), &[])?;
    let copied = target_heads(target, doc)?;
    if copied != heads {
        return Err(crate::Error::Config(format!(
            "document {doc} differs after the copy: {} has changes the source does not (was a server run on it after an earlier migration?); migrate into an empty target",
            target.describe()
        )));
    }
    Ok(false)
}

fn target_heads(target: &Backend, doc: DocumentId) -> Result<Vec<ChangeHash>, StorageError> {
    let mut heads = target.documents.load(doc)?.hydrate()?.get_heads();
    heads.sort();
    Ok(heads)
}

/// The target holds as many of each kind as the source.
fn verify_counts(source: &Backend, target: &Backend, report: &Report) -> Result<(), crate::Error> {
    let checks = [
        (
            "documents",
            target.documents.list()?.len(),
            report.documents,
        ),
        (
            "account records",
            target.directory.load()?.len(),
            report.records,
        ),
        (
            "audit entries",
            target.directory.audit(usize::MAX)?.len(),
            report.audit_entries,
        ),
        (
            "provenance rows",
            last_provenance(target)?.0,
            report.provenance_rows,
        ),
        (
            "actor bindings",
            target.changelog.actors()?.len(),
            source.changelog.actors()?.len(),
        ),
    ];
    for (what, there, expected) in checks {
        if there != expected {
            return Err(crate::Error::Config(format!(
                "after the copy {} holds {there} {what}, the source {expected}; was a server running on either side? stop it and run migrate again",
                target.describe()
            )));
        }
    }
    Ok(())
}

/// How many provenance rows `b` holds, and the last one's number (a full scan).
fn last_provenance(b: &Backend) -> Result<(usize, u64), StorageError> {
    let (mut n, mut after) = (0, 0);
    loop {
        let (rows, next) = b.changelog.feed(after, PAGE, PAGE, &|_| true)?;
        if rows.is_empty() {
            return Ok((n, after));
        }
        n += rows.len();
        after = next;
    }
}

/// Rebuilds the target's projection from the documents and rows just copied.
pub(crate) async fn reindex(
    target: &Backend,
    mut progress: impl FnMut(Progress) + Send + 'static,
) -> Result<usize, crate::Error> {
    let accounts = Accounts::open_on(
        target.directory.clone(),
        std::sync::Arc::new(SystemClock),
        AccountsConfig::default(),
    )
    .await?;
    let changelog = ChangeLog::with_store(target.changelog.clone(), accounts.clone());
    let projection = Projection::on(
        target.documents.clone(),
        target.rows.clone(),
        accounts,
        changelog,
    );
    Ok(blocking(move || {
        projection.reindex_blocking(|done, total| progress(Progress::Reindex(done, total)))
    })
    .await?)
}
