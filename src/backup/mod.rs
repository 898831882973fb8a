//! Backups of a station: `fieldsync backup --to FILE` (through the running server's admin
//! socket, or on the stopped store), `fieldsync backup verify FILE` and `fieldsync restore`.
//!
//! One consistent point without pausing anyone: the point is the change feed's last
//! sequence number when the backup starts. Every household is saved as it was at that point
//! (its heads after the last change accepted up to it, which the provenance rows record),
//! so the archive holds exactly the changes accepted up to the point and their provenance
//! rows, nothing later. Account records are read after that (a registration is written
//! before its household's first change, so every household in the archive has its
//! registration); sign-in sessions and unused enrolment codes are left out (after a
//! restore staff sign in again and new codes are made). Village catalogs, written by the
//! server without provenance, are saved whole. The staff projection is not in the archive:
//! a restore rebuilds it.
//!
//! A restore writes into an empty data directory or database only, after reading the whole
//! archive once to check it (so a damaged archive writes nothing), and the restored server
//! gets a new storage id: devices that synced after the point do not trust their old sync
//! state with it, and send again what the backup lacks.
//!
//! Must not: change the source (reads only), or write anything from an archive that has not
//! been checked whole.

pub mod archive;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use automerge::{Automerge, ChangeHash};

use crate::auth::directory::Op;
use crate::auth::Record;
use crate::ids::DocumentId;
use crate::server::backend::{Backend, Place};
use crate::server::Services;
use crate::storage::{blocking, snapshot_name, StorageError};
use archive::{ArchiveError, Entry, Manifest};

/// Rows read or written per step.
const PAGE: usize = 1000;

/// How far a backup or restore is (for a progress line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Documents saved (or checked, or restored), of all.
    Documents(usize, usize),
    /// Households re-projected after a restore, of all.
    Reindex(usize, usize),
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}: {1}")]
    File(PathBuf, std::io::Error),
}

impl From<BackupError> for crate::Error {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::Storage(s) => crate::Error::Storage(s),
            other => crate::Error::Config(other.to_string()),
        }
    }
}

/// Takes a backup of everything `services` serve into `to` (written as `to.partial`, then
/// renamed: a file named `to` is always whole). The file is readable by its owner only: it
/// holds password and token hashes.
pub async fn take(
    services: &Services,
    to: &Path,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<Manifest, BackupError> {
    if to.exists() {
        return Err(BackupError::Refused(format!(
            "{} exists already; give a new file name (a backup never overwrites one)",
            to.display()
        )));
    }
    let backend = services.backend().clone();
    let storage_id = services.server_storage_id().to_string();
    let created_at_ms = services.accounts.now().as_millis() as i64;

    // The point: the change feed as it is now.
    let b = backend.clone();
    let rows = blocking(move || {
        let mut rows = Vec::new();
        let mut after = 0;
        loop {
            let (page, next) = b.changelog.feed(after, PAGE, PAGE, &|_| true)?;
            if page.is_empty() {
                return Ok::<_, StorageError>(rows);
            }
            rows.extend(page);
            after = next;
        }
    })
    .await?;
    let feed_seq = rows.last().map_or(0, |r| r.seq);
    let mut heads_at: HashMap<DocumentId, Vec<String>> = HashMap::new();
    for r in &rows {
        heads_at.insert(r.doc, r.heads_after.clone());
    }
    // Rows written before they recorded heads say nothing of the point: such a document
    // is saved whole (it may then hold a change or two from after the point).
    heads_at.retain(|_, heads| !heads.is_empty());
    let recorded: BTreeSet<DocumentId> = rows.iter().map(|r| r.doc).collect();
    // Read after the point: every household saved below has its registration here.
    let b = backend.clone();
    let (records, audit, actors, ids) = blocking(move || {
        let records: Vec<Record> = b
            .directory
            .load()?
            .into_iter()
            .filter(|r| !matches!(r, Record::Session(_) | Record::Enrolment(_)))
            .collect();
        Ok::<_, StorageError>((
            records,
            b.directory.audit(usize::MAX)?,
            b.changelog.actors()?,
            b.documents.list()?,
        ))
    })
    .await?;
    let catalogs: BTreeSet<DocumentId> = records
        .iter()
        .filter_map(|r| match r {
            Record::Village(v) => Some(v.catalog),
            _ => None,
        })
        .collect();

    // The file is written on a blocking thread, fed entries as they are made: the runtime
    // never waits on the disk, and memory holds a few entries, not the archive.
    let partial = with_suffix(to, ".partial");
    let (tx, rx) = tokio::sync::mpsc::channel::<Entry>(64);
    let (p, dest) = (partial.clone(), to.to_path_buf());
    let writer = tokio::task::spawn_blocking(move || {
        let written = write_archive(&p, &dest, rx);
        if written.is_err() {
            let _ = std::fs::remove_file(&p);
        }
        written
    });
    // Set when a send failed because the writer had stopped: its own error is the cause.
    let writer_gone = std::sync::atomic::AtomicBool::new(false);
    let stopped = || {
        writer_gone.store(true, std::sync::atomic::Ordering::Relaxed);
        BackupError::Refused("the archive's writer stopped".into())
    };
    let made = async {
        let mut manifest = Manifest {
            storage_id,
            created_at_ms,
            feed_seq,
            ..Manifest::default()
        };
        let total = ids.len();
        for (i, id) in ids.into_iter().enumerate() {
            let at: Option<Vec<ChangeHash>> = match heads_at.get(&id) {
                Some(heads) => Some(
                    heads
                        .iter()
                        .map(|h| h.parse::<ChangeHash>())
                        .collect::<Result<_, _>>()
                        .map_err(|e| {
                            BackupError::Refused(format!(
                                "document {id}: a provenance row names unreadable heads ({e})"
                            ))
                        })?,
                ),
                // A catalog (the server's, without provenance), or a household whose rows
                // predate recorded heads: whole. Anything else had no change up to the point.
                None if catalogs.contains(&id) || recorded.contains(&id) => None,
                None => continue,
            };
            // Saved and encoded in the document's actor, off the runtime.
            let saved = services
                .hub
                .read(id, move |d| -> Result<Entry, String> {
                    match &at {
                        Some(heads) => {
                            let then = d.fork_at(heads).map_err(|e| e.to_string())?;
                            Ok(Entry::document(id, &then.get_heads(), &then.save()))
                        }
                        None => Ok(Entry::document(id, &d.get_heads(), &d.save())),
                    }
                })
                .await
                .map_err(|e| BackupError::Refused(format!("document {id}: {e}")))?;
            match saved {
                Some(Ok(entry)) => {
                    tx.send(entry).await.map_err(|_| stopped())?;
                    manifest.documents += 1;
                }
                Some(Err(e)) => {
                    return Err(BackupError::Refused(format!(
                        "document {id} cannot be saved as it was at the backup's point: {e}"
                    )))
                }
                None => {} // gone meanwhile (never for a stored document)
            }
            progress(Progress::Documents(i + 1, total));
        }
        manifest.provenance_rows = rows.len();
        manifest.records = records.len();
        manifest.audit_entries = audit.len();
        manifest.actor_bindings = actors.len();
        let rest = rows
            .into_iter()
            .map(Entry::Provenance)
            .chain(records.into_iter().map(Entry::Record))
            .chain(audit.into_iter().map(Entry::Audit))
            .chain(actors.into_iter().map(|(actor, device)| Entry::Actor {
                actor: hex::encode(actor),
                device,
            }))
            .chain(std::iter::once(Entry::Manifest(manifest.clone())));
        for entry in rest {
            tx.send(entry).await.map_err(|_| stopped())?;
        }
        Ok::<_, BackupError>(manifest)
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| BackupError::Storage(StorageError::Task(e.to_string())))?;
    // The writer removed its partial file if it failed; it fails too when the making
    // stopped early, since no manifest reached it.
    match (made, written) {
        (Ok(manifest), Ok(())) => Ok(manifest),
        (Ok(_), Err(e)) => Err(e),
        (Err(_), Err(e)) if writer_gone.load(std::sync::atomic::Ordering::Relaxed) => Err(e),
        (Err(e), _) => Err(e),
    }
}

/// Writes the entries from `rx` into `partial`, then (when the sender finished) the
/// checksum, makes it durable and renames it to `to`. On a blocking thread.
fn write_archive(
    partial: &Path,
    to: &Path,
    mut rx: tokio::sync::mpsc::Receiver<Entry>,
) -> Result<(), BackupError> {
    let file = private_file(partial)?;
    let mut w = archive::Writer::new(std::io::BufWriter::new(file))?;
    let mut manifest_seen = false;
    while let Some(entry) = rx.blocking_recv() {
        manifest_seen |= matches!(entry, Entry::Manifest(_));
        w.write(&entry)?;
    }
    if !manifest_seen {
        // The sender stopped early (it failed): no archive.
        return Err(BackupError::Refused(
            "the backup stopped before its end".into(),
        ));
    }
    let file = w
        .finish()?
        .into_inner()
        .map_err(|e| BackupError::File(partial.to_path_buf(), e.into_error()))?;
    file.sync_all()
        .map_err(|e| BackupError::File(partial.to_path_buf(), e))?;
    std::fs::rename(partial, to).map_err(|e| BackupError::File(to.to_path_buf(), e))?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads the whole archive at `path` and checks it: its checksum, every entry, every
/// document (it loads, with the heads it was saved with), and the counts against its
/// manifest. Returns the manifest.
pub fn verify(path: &Path, progress: &mut dyn FnMut(Progress)) -> Result<Manifest, BackupError> {
    let mut counted = Manifest::default();
    let mut manifest: Option<Manifest> = None;
    archive::read(open(path)?, |entry| {
        match entry {
            Entry::Document { id, heads, data } => {
                let bytes = archive::document_bytes(&data)?;
                let doc = Automerge::load(&bytes).map_err(|e| {
                    ArchiveError::Contents(format!("document {id} does not load ({e})"))
                })?;
                let mut got: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
                let mut want = heads;
                got.sort();
                want.sort();
                if got != want {
                    return Err(ArchiveError::Contents(format!(
                        "document {id} has other heads than recorded"
                    )));
                }
                counted.documents += 1;
                progress(Progress::Documents(counted.documents, 0));
            }
            Entry::Record(_) => counted.records += 1,
            Entry::Audit(_) => counted.audit_entries += 1,
            Entry::Provenance(_) => counted.provenance_rows += 1,
            Entry::Actor { .. } => counted.actor_bindings += 1,
            Entry::Manifest(m) => {
                if manifest.replace(m).is_some() {
                    return Err(ArchiveError::Contents("two manifests".into()));
                }
            }
            Entry::Header { .. } | Entry::Checksum(_) => {}
        }
        Ok(())
    })?;
    let manifest =
        manifest.ok_or_else(|| ArchiveError::Contents("the manifest is missing".into()))?;
    let expected = Manifest {
        storage_id: manifest.storage_id.clone(),
        created_at_ms: manifest.created_at_ms,
        feed_seq: manifest.feed_seq,
        ..counted
    };
    if expected != manifest {
        return Err(ArchiveError::Contents(format!(
            "it holds {} documents, {} account records, {} audit entries, {} provenance rows and {} actor bindings, its manifest says {}, {}, {}, {} and {}",
            counted.documents, counted.records, counted.audit_entries, counted.provenance_rows, counted.actor_bindings,
            manifest.documents, manifest.records, manifest.audit_entries, manifest.provenance_rows, manifest.actor_bindings
        ))
        .into());
    }
    Ok(manifest)
}

/// What a restore wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub manifest: Manifest,
    /// The restored server's storage id (new).
    pub storage_id: String,
    pub households_projected: usize,
}

/// Checks the archive at `from` whole, then writes it into `to` (an empty data directory or
/// database), gives the target a new storage id and rebuilds its projection.
pub async fn restore(
    from: &Path,
    to: &Place,
    progress: impl FnMut(Progress) + Send + 'static,
) -> Result<Restored, crate::Error> {
    if let Place::Directory(dir) = to {
        let holds_something = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if holds_something {
            return Err(BackupError::Refused(format!(
                "{} is not empty; restore into a new data directory (the server then runs with --data on it)",
                dir.display()
            ))
            .into());
        }
    }
    let path = from.to_path_buf();
    let (manifest, progress) = blocking(move || {
        let mut progress = progress;
        let m = verify(&path, &mut progress).map_err(crate::Error::from);
        Ok::<_, StorageError>((m, progress))
    })
    .await?;
    let manifest = manifest?;
    let target = crate::migrate::open_target(to).await?;
    let t = target.clone();
    if !blocking(move || crate::migrate::is_empty(&t)).await? {
        return Err(BackupError::Refused(format!(
            "{} already holds data; restore into an empty database or a new data directory",
            target.describe()
        ))
        .into());
    }
    // A new storage id (the target makes one on first use): devices re-send what the
    // archive lacks instead of trusting sync states made with the original.
    let storage_id = target.storage_id().await?.to_string();
    let (t, path, total) = (target.clone(), from.to_path_buf(), manifest.documents);
    let progress = blocking(move || {
        let mut progress = progress;
        write_all(&t, &path, total, &mut progress).map_err(|e| match e {
            BackupError::Storage(s) => s,
            other => StorageError::Io(other.to_string()),
        })?;
        Ok(progress)
    })
    .await?;
    let mut progress = progress;
    let households_projected = crate::migrate::reindex(&target, move |p| {
        if let crate::migrate::Progress::Reindex(done, total) = p {
            progress(Progress::Reindex(done, total))
        }
    })
    .await?;
    target.documents.durable().await?;
    Ok(Restored {
        manifest,
        storage_id,
        households_projected,
    })
}

/// Writes every entry of the (checked) archive into `target`.
fn write_all(
    target: &Backend,
    path: &Path,
    total: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), BackupError> {
    let mut records: Vec<Op> = Vec::new();
    let mut audit = Vec::new();
    let mut rows = Vec::new();
    let mut done = 0;
    let mut failed: Option<StorageError> = None;
    archive::read(open(path)?, |entry| {
        let step = || -> Result<(), StorageError> {
            match entry {
                Entry::Document { id, heads, data } => {
                    let bytes = archive::document_bytes(&data)
                        .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                    let mut heads: Vec<ChangeHash> =
                        heads.iter().filter_map(|h| h.parse().ok()).collect();
                    heads.sort();
                    target
                        .documents
                        .compact(id, snapshot_name(&heads), &bytes, &[])?;
                    done += 1;
                    progress(Progress::Documents(done, total));
                }
                Entry::Record(r) => records.push(Op::Put(r)),
                Entry::Audit(a) => audit.push(a),
                Entry::Provenance(r) => {
                    rows.push(r);
                    if rows.len() >= PAGE {
                        target.changelog.import(&rows)?;
                        rows.clear();
                    }
                }
                Entry::Actor { actor, device } => {
                    let actor = hex::decode(&actor)
                        .map_err(|e| StorageError::Corrupt(format!("an actor is not hex ({e})")))?;
                    target.changelog.bind_actor(&actor, &device)?;
                }
                Entry::Header { .. } | Entry::Manifest(_) | Entry::Checksum(_) => {}
            }
            Ok(())
        };
        step().map_err(|e| {
            let text = e.to_string();
            failed = Some(e);
            ArchiveError::Contents(text)
        })
    })
    .map_err(|e| match failed.take() {
        Some(s) => BackupError::Storage(s),
        None => e.into(),
    })?;
    target.changelog.import(&rows)?;
    for page in records.chunks(PAGE) {
        target.directory.commit(page, None)?;
    }
    for page in audit.chunks(PAGE) {
        target.directory.import_audit(page)?;
    }
    target.documents.flush()?;
    Ok(())
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, BackupError> {
    std::fs::File::open(path)
        .map(std::io::BufReader::new)
        .map_err(|e| BackupError::File(path.to_path_buf(), e))
}

fn private_file(path: &Path) -> Result<std::fs::File, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| BackupError::File(path.to_path_buf(), e))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
