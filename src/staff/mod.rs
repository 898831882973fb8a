//! The staff desk: what station staff (and officers, within their villages) can ask of the
//! merged records through the API — lists, coverage, export, a household's detail and
//! history, the change feed — and what staff can do to them: review (pinned to the heads they
//! saw), create and manage follow-ups, correct a member's details. Every edit is an Automerge
//! change the server makes through the hub on behalf of the staff account, so it syncs to the
//! officers' devices like any other change and its provenance names the staff member.
//!
//! Owns the access rules of these operations (a household the caller may not read is
//! "not found", exactly like one that does not exist). Must not: speak HTTP (that is
//! `server`), touch sled directly (that is `projection` and `accounts`), or edit documents
//! other than through the hub.

use std::sync::{Arc, Mutex};

use automerge::Automerge;

use crate::accounts::Accounts;
use crate::auth::{Access, Principal, ReadingScope};
use crate::changelog::{ChangeLog, FeedPage};
use crate::hub::{Hub, HubError};
use crate::ids::DocumentId;
use crate::projection::{Coverage, Cursor, Filter, HouseholdPage, Projection};
use crate::records::merge::{MergeCopied, MergeMark};
use crate::records::{
    self, FollowUpUpdate, HistoryEntry, HouseholdDetail, RecordError, ReviewState,
};
use crate::storage::{blocking, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum StaffError {
    /// No such household, or not one the caller may read (the same answer for both).
    #[error("no household {0} that you may see")]
    NotFound(DocumentId),
    #[error("{0}")]
    NoSuchEntry(String),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Invalid(String),
    /// The request clashes with the records' state (a household merged elsewhere).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the edit could not be made now: {0}")]
    Hub(HubError),
    #[error(
        "{MAX_CONCURRENT_EXPORTS} exports are running already; try again when one has finished"
    )]
    Busy,
}

/// One of the [`MAX_CONCURRENT_EXPORTS`] export slots.
pub struct ExportSlot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

/// Exports streamed at once at most: each holds a blocking thread while its client reads,
/// and those threads also serve the sync path.
pub const MAX_CONCURRENT_EXPORTS: usize = 4;

impl From<HubError> for StaffError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::Storage(s) => StaffError::Storage(s),
            other => StaffError::Hub(other),
        }
    }
}

/// The detail of a household as the API returns it.
/// One page of a household's history.
#[derive(Debug, serde::Serialize)]
pub struct HistoryPage {
    pub changes: Vec<HistoryEntry>,
    /// Changes in the whole history.
    pub total: usize,
    /// Where the next page starts, if there is one.
    pub next_offset: Option<usize>,
}

#[derive(Debug, serde::Serialize)]
pub struct Detail {
    pub id: DocumentId,
    pub url: String,
    pub station: String,
    pub village: String,
    /// Why the document does not conform (empty: it does).
    pub quarantine: Vec<String>,
    /// Visits in the whole record; `visits` (and `value.visits`) hold one page of them.
    pub visits_total: usize,
    /// The `visits_offset` of the next (older) page, if there is one.
    pub visits_next_offset: Option<usize>,
    /// Set when the record is shown as it was at an earlier point (`?at=` or `?heads=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<AsOfView>,
    /// Other households of its village at the same address (normalised): likely the same
    /// household registered twice. Absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub possible_duplicates: Vec<DocumentId>,
    /// Visits whose notes staff chose for the police–community meeting. Absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub for_meeting: Vec<String>,
    /// Set when staff merged this household into another: it is kept, but left the lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<MergeMark>,
    /// What changed on this (merged) household after the merge: an officer's late offline
    /// visit. Merging again copies new entries into the survivor.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after_merge: Vec<String>,
    /// The households merged into this one. Absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<MergedHousehold>,
    #[serde(flatten)]
    pub detail: HouseholdDetail,
}

/// A household merged into the one shown.
#[derive(Debug, serde::Serialize)]
pub struct MergedHousehold {
    pub id: DocumentId,
    pub url: String,
    pub address_label: String,
    pub merged_by: String,
    pub merged_at_ms: i64,
    /// What changed on it after the merge (dotted paths); empty when nothing did.
    pub after_merge: Vec<String>,
}

/// A merge request: the household to retire into the one named in the path.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeRequest {
    pub retire: String,
}

/// What a merge did.
#[derive(Debug, serde::Serialize)]
pub struct MergeOutcome {
    pub survivor: DocumentId,
    pub retired: DocumentId,
    /// Whether the retired household had been merged into this survivor before (this run
    /// copied only what arrived since).
    pub merged_before: bool,
    #[serde(flatten)]
    pub copied: MergeCopied,
}

/// Which earlier point of a household to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AsOf {
    /// Every change the server had received by then (its receive time, ms).
    ReceivedBy(i64),
    /// The document at these heads (and everything they depend on).
    Heads(Vec<automerge::ChangeHash>),
}

/// The point a detail shows, as the answer says it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AsOfView {
    /// The receive time asked for, if the point was given as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_by_ms: Option<i64>,
    /// The record's heads at that point (hex).
    pub heads: Vec<String>,
    /// Changes the record had then, of all it has now.
    pub changes_then: usize,
    pub changes_now: usize,
}

/// Which visits a detail carries: the `limit` most recent after skipping `offset` of the
/// most recent. A household's visits grow without end; the rest of the record does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VisitPage {
    pub offset: usize,
    pub limit: usize,
}

impl VisitPage {
    pub const DEFAULT_LIMIT: usize = 200;
    pub const MAX_LIMIT: usize = 1000;
}

impl Default for VisitPage {
    fn default() -> Self {
        Self {
            offset: 0,
            limit: Self::DEFAULT_LIMIT,
        }
    }
}

/// Keeps one page of the visits (still oldest first) in `detail` and in its merged value;
/// returns the total and the next page's offset.
fn page_visits(detail: &mut HouseholdDetail, page: VisitPage) -> (usize, Option<usize>) {
    let total = detail.visits.len();
    let end = total.saturating_sub(page.offset);
    let start = end.saturating_sub(page.limit);
    let kept: Vec<_> = detail
        .visits
        .drain(..)
        .skip(start)
        .take(end - start)
        .collect();
    if let Some(serde_json::Value::Object(visits)) = detail.value.get_mut("visits") {
        let ids: std::collections::HashSet<&str> = kept.iter().map(|e| e.id.as_str()).collect();
        visits.retain(|k, _| ids.contains(k.as_str()));
    }
    detail.visits = kept;
    (total, (start > 0).then_some(total - start))
}

/// A review request: `state` and an optional comment.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewRequest {
    pub state: ReviewState,
    #[serde(default)]
    pub comment: String,
}

/// A new follow-up.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowUpRequest {
    pub task: String,
    /// The officer who should do it (an account of the household's village).
    pub owner: String,
    pub due_ms: i64,
    #[serde(default)]
    pub matter: Option<String>,
}

/// A correction of a member's `name`, `relation` or `phone`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberCorrection {
    pub field: String,
    pub value: String,
}

/// Whether a visit's notes go to the meeting.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeetingMark {
    pub for_meeting: bool,
}

#[derive(Clone)]
pub struct StaffDesk {
    hub: Hub,
    accounts: Accounts,
    changelog: ChangeLog,
    projection: Projection,
    exports: std::sync::Arc<tokio::sync::Semaphore>,
    merges: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl StaffDesk {
    pub fn new(hub: Hub, accounts: Accounts, changelog: ChangeLog, projection: Projection) -> Self {
        Self {
            hub,
            accounts,
            changelog,
            projection,
            exports: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_EXPORTS)),
            merges: std::sync::Arc::default(),
        }
    }

    fn scope(&self, who: &Principal) -> Result<ReadingScope, StaffError> {
        self.accounts
            .with_directory(|d| d.reading_scope(who))
            .ok_or(StaffError::Forbidden("this account may not read records"))
    }

    /// The household's registration, if `who` may read it.
    fn readable(&self, who: &Principal, doc: DocumentId) -> Result<(String, String), StaffError> {
        self.accounts
            .with_directory(|d| {
                let ok = matches!(d.access(who, doc), Access::Read | Access::ReadWrite);
                d.household(doc)
                    .filter(|_| ok)
                    .map(|h| (h.station.to_string(), h.village.to_string()))
            })
            .ok_or(StaffError::NotFound(doc))
    }

    fn editable(&self, who: &Principal, doc: DocumentId) -> Result<(), StaffError> {
        self.readable(who, doc)?;
        if !self.scope(who)?.may_edit {
            return Err(StaffError::Forbidden(
                "officers change records on their devices; reviews and follow-ups through the API are for staff",
            ));
        }
        Ok(())
    }

    /// Whether `who` may read records at all (checked before a streamed reply starts).
    pub fn check_reader(&self, who: &Principal) -> Result<(), StaffError> {
        self.scope(who).map(|_| ())
    }

    pub async fn list(
        &self,
        who: &Principal,
        filter: Filter,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<HouseholdPage, StaffError> {
        filter.validate().map_err(StaffError::Invalid)?;
        let scope = self.scope(who)?;
        let (p, now) = (self.projection.clone(), self.accounts.now());
        Ok(blocking(move || p.list_blocking(&scope, &filter, cursor, limit, now)).await?)
    }

    pub async fn coverage(&self, who: &Principal, days: u32) -> Result<Vec<Coverage>, StaffError> {
        let scope = self.scope(who)?;
        let villages: Vec<String> = self.accounts.with_directory(|d| {
            d.villages_of(&scope.station)
                .into_iter()
                .filter(|v| scope.covers(scope.station.as_str(), v.name.as_str()))
                .map(|v| v.name.to_string())
                .collect()
        });
        let (p, now) = (self.projection.clone(), self.accounts.now());
        Ok(blocking(move || p.coverage_blocking(&scope, &villages, days, now)).await?)
    }

    /// The monthly report for `month` of the caller's villages (or only `village`), at the
    /// station's UTC offset.
    pub async fn monthly_report(
        &self,
        who: &Principal,
        month: crate::projection::report::Month,
        village: Option<String>,
        offset_minutes: i32,
    ) -> Result<crate::projection::report::MonthlyReport, StaffError> {
        let scope = self.scope(who)?;
        let villages: Vec<String> = self.accounts.with_directory(|d| {
            d.villages_of(&scope.station)
                .into_iter()
                .filter(|v| scope.covers(scope.station.as_str(), v.name.as_str()))
                .map(|v| v.name.to_string())
                .filter(|v| village.as_ref().is_none_or(|w| w == v))
                .collect()
        });
        if let (Some(v), true) = (&village, villages.is_empty()) {
            return Err(StaffError::Invalid(format!(
                "no village `{v}` that you may see in your station"
            )));
        }
        let (p, now) = (self.projection.clone(), self.accounts.now());
        Ok(blocking(move || {
            p.monthly_report_blocking(&scope, &villages, month, offset_minutes, now)
        })
        .await?)
    }

    /// A slot for one export, taken before its response starts (so a refusal can still be
    /// a 503); [`StaffDesk::export`] holds it until the export ends.
    pub fn reserve_export(&self) -> Result<ExportSlot, StaffError> {
        self.exports
            .clone()
            .try_acquire_owned()
            .map(ExportSlot)
            .map_err(|_| StaffError::Busy)
    }

    /// Runs the export on a blocking thread, handing CSV chunks to `sink` (which blocks
    /// while the client is slow, so memory stays bounded).
    pub async fn export(
        &self,
        slot: ExportSlot,
        who: &Principal,
        filter: Filter,
        sink: impl FnMut(Vec<u8>) -> bool + Send + 'static,
    ) -> Result<usize, StaffError> {
        filter.validate().map_err(StaffError::Invalid)?;
        let scope = self.scope(who)?;
        let (p, now) = (self.projection.clone(), self.accounts.now());
        Ok(blocking(move || {
            let _slot = slot;
            p.export_blocking(&scope, &filter, now, sink)
        })
        .await?)
    }

    pub async fn changes(
        &self,
        who: &Principal,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, StaffError> {
        self.scope(who)?;
        Ok(self.changelog.changes_after(who, after, limit).await?)
    }

    /// A household's merged record with one page of its visits (see [`VisitPage`]), as it
    /// is now or, with `as_of`, as it was then: its merged value, conflicts, review and
    /// quarantine reasons at that point.
    pub async fn detail(
        &self,
        who: &Principal,
        doc: DocumentId,
        page: VisitPage,
        as_of: Option<AsOf>,
    ) -> Result<Detail, StaffError> {
        let (station, village) = self.readable(who, doc)?;
        let changelog = self.changelog.clone();
        let (mut detail, quarantine, as_of, for_meeting, merged_into, after_merge) = self
            .hub
            .read(doc, move |content: &Automerge| {
                let rows = changelog.provenance_blocking(doc)?;
                let attribution = crate::projection::attribution(content, &rows);
                let (then, view) = match as_of_point(content, &rows, as_of) {
                    Ok(point) => point,
                    Err(e) => return Ok(Err(e)),
                };
                let shown = then.as_ref().unwrap_or(content);
                let mark = records::merge::merge_mark(shown, &attribution);
                let after = mark
                    .as_ref()
                    .map(|m| records::merge::changed_after_merge(shown, m))
                    .unwrap_or_default();
                Ok::<_, StorageError>(Ok((
                    records::household_detail(shown, &attribution),
                    records::validate(shown),
                    view,
                    records::meeting_marks(shown),
                    mark,
                    after,
                )))
            })
            .await?
            .ok_or(StaffError::NotFound(doc))???;
        let (visits_total, visits_next_offset) = page_visits(&mut detail, page);
        let (p, at) = (self.projection.clone(), station.clone());
        let (possible_duplicates, merged_from) = blocking(move || {
            let merged_from = p
                .merged_into_blocking(&at, doc)?
                .into_iter()
                .map(|row| {
                    let mark = row.summary.merged_into.clone();
                    MergedHousehold {
                        url: row.id.to_url(),
                        id: row.id,
                        address_label: row.summary.address_label,
                        merged_by: mark.as_ref().map(|m| m.by.clone()).unwrap_or_default(),
                        merged_at_ms: mark.map(|m| m.at_ms).unwrap_or_default(),
                        after_merge: row.summary.after_merge,
                    }
                })
                .collect::<Vec<_>>();
            Ok::<_, StorageError>((p.possible_duplicates_blocking(&at, doc)?, merged_from))
        })
        .await?;
        Ok(Detail {
            id: doc,
            url: doc.to_url(),
            station,
            village,
            quarantine,
            visits_total,
            visits_next_offset,
            as_of,
            possible_duplicates,
            for_meeting,
            merged_into,
            after_merge,
            merged_from,
            detail,
        })
    }

    /// A page of the household's history in server order: up to `limit` changes from
    /// position `offset`, with the total. Paged because every entry costs a diff and a
    /// household may have many thousands of changes.
    pub async fn history(
        &self,
        who: &Principal,
        doc: DocumentId,
        offset: usize,
        limit: usize,
    ) -> Result<HistoryPage, StaffError> {
        self.readable(who, doc)?;
        let changelog = self.changelog.clone();
        let page = self
            .hub
            .read(doc, move |content: &Automerge| {
                let rows = changelog.provenance_blocking(doc)?;
                let attribution = crate::projection::attribution(content, &rows);
                let order: Vec<automerge::ChangeHash> =
                    rows.iter().filter_map(|r| r.hash.parse().ok()).collect();
                let total = order.len();
                let start = offset.min(total);
                let end = start.saturating_add(limit).min(total);
                Ok::<_, StorageError>(HistoryPage {
                    changes: records::history(content, &attribution, &order[start..end]),
                    total,
                    next_offset: (end < total).then_some(end),
                })
            })
            .await?
            .ok_or(StaffError::NotFound(doc))??;
        Ok(page)
    }

    /// Makes `edit` on behalf of `who`, mapping a refused edit to a typed error.
    async fn edit(
        &self,
        who: &Principal,
        doc: DocumentId,
        edit: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), RecordError>
            + Send
            + 'static,
    ) -> Result<(), StaffError> {
        self.editable(who, doc)?;
        let refused: Arc<Mutex<Option<RecordError>>> = Arc::default();
        let slot = refused.clone();
        let result = self
            .hub
            .change_as(
                doc,
                who.clone(),
                Box::new(move |d: &mut Automerge| {
                    // Staff edits are checked against the schema before they are kept: an
                    // edit that would quarantine the household (an emptied name) is refused.
                    let before = records::validate(d);
                    let mut tx = d.transaction();
                    if let Err(e) = edit(&mut tx) {
                        tx.rollback();
                        let message = e.to_string();
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return Err(message);
                    }
                    let broken: Vec<String> = records::validate(&tx)
                        .into_iter()
                        .filter(|r| !before.contains(r))
                        .collect();
                    if let Some(first) = broken.first() {
                        tx.rollback();
                        return Err(format!(
                            "the edit would break the record ({first}); nothing was changed"
                        ));
                    }
                    tx.commit();
                    Ok(())
                }),
            )
            .await;
        match result {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(StaffError::NotFound(doc)),
            Err(HubError::Edit(message)) => {
                match refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(RecordError::NoSuchEntry { .. }) => Err(StaffError::NoSuchEntry(message)),
                    _ => Err(StaffError::Invalid(message)),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records a review; an approval is pinned to the heads the document has now.
    pub async fn review(
        &self,
        who: &Principal,
        doc: DocumentId,
        req: ReviewRequest,
    ) -> Result<Detail, StaffError> {
        let by = who.user.to_string();
        let at = self.accounts.now().as_millis() as i64;
        self.edit(who, doc, move |tx| {
            let heads = tx.get_heads();
            records::set_review(tx, req.state, &by, at, &heads, &req.comment)
        })
        .await?;
        self.detail(who, doc, VisitPage::default(), None).await
    }

    /// Creates a follow-up; returns its id.
    pub async fn create_follow_up(
        &self,
        who: &Principal,
        doc: DocumentId,
        req: FollowUpRequest,
    ) -> Result<String, StaffError> {
        self.check_owner(doc, &req.owner)?;
        let id: Arc<Mutex<String>> = Arc::default();
        let out = id.clone();
        self.edit(who, doc, move |tx| {
            let new = records::add_follow_up(
                tx,
                &records::NewFollowUp {
                    matter: req.matter.filter(|m| !m.is_empty()),
                    task: req.task,
                    owner: req.owner,
                    due_ms: req.due_ms,
                },
            )?;
            *out.lock().unwrap_or_else(|p| p.into_inner()) = new;
            Ok(())
        })
        .await?;
        let id = id.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(id)
    }

    /// Reassigns, reschedules, closes or annotates a follow-up.
    pub async fn update_follow_up(
        &self,
        who: &Principal,
        doc: DocumentId,
        follow_up: String,
        update: FollowUpUpdate,
    ) -> Result<(), StaffError> {
        entry_key("follow-up", &follow_up)?;
        if let Some(owner) = &update.owner {
            self.check_owner(doc, owner)?;
        }
        self.edit(who, doc, move |tx| {
            records::update_follow_up(tx, &follow_up, &update)
        })
        .await
    }

    /// Corrects a member's name, relation or phone.
    pub async fn correct_member(
        &self,
        who: &Principal,
        doc: DocumentId,
        member: String,
        c: MemberCorrection,
    ) -> Result<(), StaffError> {
        entry_key("member", &member)?;
        self.edit(who, doc, move |tx| {
            records::set_member_field(tx, &member, &c.field, &c.value)
        })
        .await
    }

    /// Marks (or unmarks) a visit's notes for the police–community meeting.
    pub async fn mark_for_meeting(
        &self,
        who: &Principal,
        doc: DocumentId,
        visit: String,
        mark: MeetingMark,
    ) -> Result<(), StaffError> {
        entry_key("visit", &visit)?;
        let by = who.user.to_string();
        let at = self.accounts.now().as_millis() as i64;
        self.edit(who, doc, move |tx| {
            records::mark_for_meeting(tx, &visit, mark.for_meeting, &by, at)
        })
        .await
    }

    /// Merges `retire` into `survivor` (`records::merge`): copies every member, visit,
    /// matter, follow-up, review comment and meeting mark the survivor does not have, then
    /// marks the retired household merged at the point its copy was taken. Running it
    /// again copies only what arrived since. Both must be households of one village that
    /// the caller may edit.
    pub async fn merge(
        &self,
        who: &Principal,
        survivor: DocumentId,
        retire: DocumentId,
    ) -> Result<MergeOutcome, StaffError> {
        if retire == survivor {
            return Err(StaffError::Invalid(
                "a household cannot be merged into itself; `retire` names the other one".into(),
            ));
        }
        self.editable(who, survivor)?;
        let (station, village) = self.readable(who, survivor)?;
        self.editable(who, retire)?;
        let (retired_station, retired_village) = self.readable(who, retire)?;
        if (&retired_station, &retired_village) != (&station, &village) {
            return Err(StaffError::Invalid(format!(
                "only households of one village can be merged: this one is in {village}, {retire} in {retired_village}"
            )));
        }
        // One merge at a time on this server: two at once could each copy a household and
        // mark it merged into a different survivor.
        let _one_at_a_time = self.merges.lock().await;
        let (p, at) = (self.projection.clone(), station.clone());
        let survivor_row = blocking(move || p.row_blocking(&at, survivor)).await?;
        if let Some(mark) = survivor_row.and_then(|r| r.summary.merged_into) {
            return Err(StaffError::Conflict(format!(
                "this household was itself merged into {}; merge into that one",
                mark.into
            )));
        }

        let changelog = self.changelog.clone();
        let source = self
            .hub
            .read(retire, move |content: &Automerge| {
                let rows = changelog.provenance_blocking(retire)?;
                let attribution = crate::projection::attribution(content, &rows);
                Ok::<_, StorageError>(records::merge::merge_source(content, &attribution, retire))
            })
            .await?
            .ok_or(StaffError::NotFound(retire))??;
        if let Some(previous) = source.previous.as_ref().filter(|m| m.into != survivor) {
            return Err(StaffError::Conflict(format!(
                "{retire} was merged into {} by {}; open that household",
                previous.into, previous.by
            )));
        }
        let merged_before = source.previous.is_some();
        let heads = source.heads.clone();

        let copied: Arc<Mutex<MergeCopied>> = Arc::default();
        let out = copied.clone();
        self.edit(who, survivor, move |tx| {
            *out.lock().unwrap_or_else(|p| p.into_inner()) =
                records::merge::copy_into_survivor(tx, &source)?;
            Ok(())
        })
        .await?;
        // Marked after the copy is stored: a failure in between leaves a survivor with
        // the copies and an unmarked household, and running the merge again finishes it.
        let by = who.user.to_string();
        let at = self.accounts.now().as_millis() as i64;
        self.edit(who, retire, move |tx| {
            records::merge::mark_merged(tx, survivor, &by, at, &heads)
        })
        .await?;
        let copied = std::mem::take(&mut *copied.lock().unwrap_or_else(|p| p.into_inner()));
        tracing::info!(%survivor, retired = %retire, user = %who.user, copied = ?copied.copied,
            comments = copied.comments, already_there = copied.already_there, "households merged");
        Ok(MergeOutcome {
            survivor,
            retired: retire,
            merged_before,
            copied,
        })
    }

    /// A follow-up's owner must be an officer of the household's village.
    fn check_owner(&self, doc: DocumentId, owner: &str) -> Result<(), StaffError> {
        let ok = self.accounts.with_directory(|d| {
            let Some(h) = d.household(doc) else {
                return false;
            };
            d.users().iter().any(|u| {
                u.name.as_str() == owner
                    && !u.disabled
                    && u.station == h.station
                    && u.villages.contains(&h.village)
            })
        });
        if ok {
            Ok(())
        } else {
            Err(StaffError::Invalid(format!(
                "`{owner}` is not an active officer of this household's village; choose one from `fieldsync admin user list`"
            )))
        }
    }
}

/// An entry id from a path must be an entry key (a UUID); anything else is answered as
/// an entry the household does not have.
fn entry_key(what: &str, id: &str) -> Result<(), StaffError> {
    if records::is_entry_key(id) {
        Ok(())
    } else {
        Err(StaffError::NoSuchEntry(format!(
            "no {what} `{}` in this household (ids are UUIDs)",
            id.escape_debug()
        )))
    }
}

/// The document at `as_of` (`None`: as it is now), with how the answer names that point.
#[allow(clippy::type_complexity)]
fn as_of_point(
    content: &Automerge,
    rows: &[crate::changelog::ProvenanceRow],
    as_of: Option<AsOf>,
) -> Result<(Option<Automerge>, Option<AsOfView>), StaffError> {
    let Some(as_of) = as_of else {
        return Ok((None, None));
    };
    let (heads, received_by_ms) = match as_of {
        // Everything received by then, in server order (a change's dependencies were
        // received before it, so this is a closed set).
        AsOf::ReceivedBy(t) => {
            let upto: Vec<automerge::ChangeHash> = rows
                .iter()
                .filter(|r| r.received_at.as_millis() as i64 <= t)
                .filter_map(|r| r.hash.parse().ok())
                .collect();
            if upto.is_empty() {
                return Err(StaffError::Invalid(
                    "the server had received nothing of this household by then; give a later `at`"
                        .into(),
                ));
            }
            (upto, Some(t))
        }
        AsOf::Heads(heads) => {
            if let Some(unknown) = heads
                .iter()
                .find(|h| content.get_change_meta_by_hash(h).is_none())
            {
                return Err(StaffError::Invalid(format!(
                    "`heads`: {unknown} is not a change of this household"
                )));
            }
            (heads, None)
        }
    };
    let then = content
        .fork_at(&heads)
        .map_err(|e| StaffError::Invalid(format!("that point cannot be shown ({e})")))?;
    let view = AsOfView {
        received_by_ms,
        heads: then.get_heads().iter().map(|h| h.to_string()).collect(),
        changes_then: then.get_changes_meta(&[]).len(),
        changes_now: content.get_changes_meta(&[]).len(),
    };
    Ok((Some(then), Some(view)))
}
