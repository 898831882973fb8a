//! Staff queries over the projection: the filtered, cursor-paged household list, village
//! coverage, and the streamed CSV export. Each reads projection rows only (never a
//! document) and is limited to a [`ReadingScope`]. Quarantined households stay out of every
//! list and count unless asked for (`quarantined=true`). Must not decide access itself.

use std::collections::BTreeMap;

use super::store::ListQuery;
use super::{HouseholdRow, Projection, VillageCounts};
use crate::auth::ReadingScope;
use crate::ids::{DocumentId, Timestamp};
use crate::records::{FollowUpStatus, MatterKind, MatterStatus, ReviewState};
use crate::storage::StorageError;

/// The list and export filters (query parameters of `/api/v1/households` and
/// `/api/v1/export.csv`). Every field narrows the result; none given: all households.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub village: Option<String>,
    /// An account that delivered a visit.
    pub officer: Option<String>,
    /// Has a matter of this kind (open ones only, unless `matter_status` says otherwise).
    pub matter_kind: Option<MatterKind>,
    /// `open`, or one matter status.
    pub matter_status: Option<String>,
    pub follow_up_status: Option<FollowUpStatus>,
    /// Has an open follow-up past its due date.
    pub overdue: Option<bool>,
    /// A review state, or `changed_since_approval`.
    pub review: Option<String>,
    /// Changed at or after this server time (ms since the epoch).
    pub updated_since: Option<i64>,
    /// Case-insensitive text in the address, member names, notes, matters or tasks.
    pub q: Option<String>,
    /// Has fields with concurrent values.
    pub conflicts: Option<bool>,
    /// `true`: list only quarantined households (they are never in the normal lists).
    pub quarantined: Option<bool>,
    /// `true`: list only households merged into another (never in the normal lists);
    /// `after_merge`: only those that changed after their merge.
    pub merged: Option<MergedFilter>,
}

/// Which merged households a list shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergedFilter {
    /// Every household merged into another.
    #[serde(rename = "true")]
    All,
    /// Those that changed after their merge.
    AfterMerge,
}

impl Filter {
    /// Checks the values that are not typed: says what is accepted.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(s) = &self.matter_status {
            if s != "open" && MatterStatus::parse(s).is_none() {
                return Err(format!(
                    "matter_status `{s}` is not one of open | {}",
                    MatterStatus::choices()
                ));
            }
        }
        if let Some(r) = &self.review {
            if r != "changed_since_approval" && ReviewState::parse(r).is_none() {
                return Err(format!(
                    "review `{r}` is not one of {} | changed_since_approval",
                    ReviewState::choices()
                ));
            }
        }
        Ok(())
    }

    pub fn matches(&self, row: &HouseholdRow, now_ms: i64) -> bool {
        let s = &row.summary;
        match self.merged {
            None if row.merged() => return false,
            None => {
                if row.quarantined() != self.quarantined.unwrap_or(false) {
                    return false;
                }
            }
            Some(_) if !row.merged() => return false,
            Some(MergedFilter::AfterMerge) if s.after_merge.is_empty() => return false,
            Some(_) => {}
        }
        if self.village.as_ref().is_some_and(|v| *v != row.village) {
            return false;
        }
        if self
            .officer
            .as_ref()
            .is_some_and(|o| !s.officers.contains(o))
        {
            return false;
        }
        if self.matter_kind.is_some() || self.matter_status.is_some() {
            let wanted_status = self.matter_status.as_deref().unwrap_or("open");
            let any = s.matters.iter().any(|m| {
                self.matter_kind.is_none_or(|k| m.kind == k.as_str())
                    && if wanted_status == "open" {
                        m.open
                    } else {
                        m.status == wanted_status
                    }
            });
            if !any {
                return false;
            }
        }
        if let Some(st) = self.follow_up_status {
            if !s.follow_ups.iter().any(|f| f.status == st.as_str()) {
                return false;
            }
        }
        if let Some(want) = self.overdue {
            if (s.overdue(now_ms) > 0) != want {
                return false;
            }
        }
        match self.review.as_deref() {
            Some("changed_since_approval") if !s.changed_since_approval => return false,
            Some("changed_since_approval") | None => {}
            Some(state) if s.review_state != state => return false,
            Some(_) => {}
        }
        if self.updated_since.is_some_and(|t| row.updated_at_ms < t) {
            return false;
        }
        if let Some(want) = self.conflicts {
            if (s.conflicts > 0) != want {
                return false;
            }
        }
        if let Some(q) = &self.q {
            let q = q.trim().to_lowercase();
            if !q.is_empty() && !s.search_text.contains(&q) {
                return false;
            }
        }
        true
    }
}

/// Where a page ends: the last row's update time and id (the list is newest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub updated_at_ms: i64,
    pub id: DocumentId,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}.{}", self.updated_at_ms, self.id)
    }

    pub fn decode(s: &str) -> Option<Cursor> {
        let (t, id) = s.split_once('.')?;
        Some(Cursor {
            updated_at_ms: t.parse().ok()?,
            id: id.parse().ok()?,
        })
    }

    /// Where `row` is in a list.
    pub fn of(row: &HouseholdRow) -> Cursor {
        Cursor {
            updated_at_ms: row.updated_at_ms,
            id: row.id,
        }
    }

    /// The list's order: newest change first, then by id.
    pub fn key(&self) -> (std::cmp::Reverse<i64>, DocumentId) {
        (std::cmp::Reverse(self.updated_at_ms), self.id)
    }
}

/// One household in a list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ListItem {
    pub id: DocumentId,
    pub url: String,
    pub village: String,
    pub address_label: String,
    pub updated_at_ms: i64,
    pub last_visit_at_ms: Option<i64>,
    pub visit_count: u32,
    pub officers: Vec<String>,
    pub open_matters: BTreeMap<String, u32>,
    pub follow_ups_todo: usize,
    pub follow_ups_overdue: usize,
    pub review_state: String,
    pub changed_since_approval: bool,
    pub conflicts: u32,
    /// Why it is quarantined (only in `quarantined=true` lists).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quarantine: Vec<String>,
    /// Other households of its village at the same address (normalised): likely the same
    /// household registered twice. Absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub possible_duplicates: Vec<DocumentId>,
    /// The household it was merged into (only in `merged=` lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<crate::records::merge::MergeMark>,
    /// What changed on it after its merge (only in `merged=` lists).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after_merge: Vec<String>,
}

impl ListItem {
    fn new(row: HouseholdRow, now_ms: i64) -> Self {
        let s = row.summary;
        ListItem {
            url: row.id.to_url(),
            follow_ups_todo: s.follow_ups_todo(),
            follow_ups_overdue: 0,
            id: row.id,
            village: row.village,
            address_label: s.address_label.clone(),
            updated_at_ms: row.updated_at_ms,
            last_visit_at_ms: s.last_visit_at_ms,
            visit_count: s.visit_count,
            officers: s.officers.clone(),
            open_matters: s.open_matters.clone(),
            review_state: s.review_state.clone(),
            changed_since_approval: s.changed_since_approval,
            conflicts: s.conflicts,
            quarantine: s.quarantine.clone(),
            possible_duplicates: Vec::new(),
            merged_into: s.merged_into.clone(),
            after_merge: s.after_merge.clone(),
        }
        .with_overdue(&s, now_ms)
    }

    fn with_overdue(mut self, s: &crate::records::HouseholdSummary, now_ms: i64) -> Self {
        self.follow_ups_overdue = s.overdue(now_ms);
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HouseholdPage {
    pub households: Vec<ListItem>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// Matching households in all pages.
    pub total: usize,
}

/// One village's coverage.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Coverage {
    pub village: String,
    pub households: i64,
    pub visited_recently: i64,
    pub never_visited: i64,
    pub open_matters: BTreeMap<String, i64>,
    pub open_matters_total: i64,
    pub follow_ups_todo: i64,
    pub follow_ups_overdue: i64,
    pub quarantined: i64,
    pub visits: i64,
    /// Households merged into another, and those of them that changed after the merge.
    pub merged: i64,
    pub changed_after_merge: i64,
}

/// The export's columns, in order.
pub const CSV_HEADER: [&str; 20] = [
    "household_id",
    "village",
    "address",
    "premises",
    "review_state",
    "open_matters",
    "follow_ups_todo",
    "visit_id",
    "officer",
    "device",
    "received_at_utc",
    "started_at_utc",
    "ended_at_utc",
    "outcome",
    "mode",
    "people_met",
    "publicity",
    "security_score",
    "satisfaction",
    "notes",
];

/// The villages a scope limits a reader to (`None`: the whole station).
fn scope_villages(scope: &ReadingScope) -> Option<Vec<String>> {
    scope
        .villages
        .as_ref()
        .map(|v| v.iter().map(|x| x.as_str().to_string()).collect())
}

/// Bytes of CSV handed to the sink at a time.
const EXPORT_CHUNK_BYTES: usize = 64 * 1024;

impl Projection {
    /// A page of households within `scope` that match `filter`, newest change first.
    pub fn list_blocking(
        &self,
        scope: &ReadingScope,
        filter: &Filter,
        cursor: Option<Cursor>,
        limit: usize,
        now: Timestamp,
    ) -> Result<HouseholdPage, StorageError> {
        let now_ms = now.as_millis() as i64;
        let villages = scope_villages(scope);
        let answer = self.inner.rows.list(&ListQuery {
            station: scope.station.as_str(),
            villages: villages.as_deref(),
            filter,
            now_ms,
            after: cursor,
            limit,
        })?;
        let same = self.same_address_blocking(scope.station.as_str(), &answer.rows)?;
        Ok(HouseholdPage {
            households: answer
                .rows
                .into_iter()
                .map(|r| {
                    let others = others_at(&same, &r);
                    let mut item = ListItem::new(r, now_ms);
                    item.possible_duplicates = others;
                    item
                })
                .collect(),
            next_cursor: answer.next.map(|c| c.encode()),
            total: answer.total,
        })
    }

    /// The households sharing an address with each of `rows` (see
    /// [`super::store::ProjectionStore::same_address`]).
    fn same_address_blocking(
        &self,
        station: &str,
        rows: &[HouseholdRow],
    ) -> Result<super::store::SameAddress, StorageError> {
        let mut wanted: Vec<(String, String)> = rows
            .iter()
            .filter(|r| !r.summary.address_key.is_empty())
            .map(|r| (r.village.clone(), r.summary.address_key.clone()))
            .collect();
        wanted.sort();
        wanted.dedup();
        self.inner.rows.same_address(station, &wanted)
    }

    /// Other households of `doc`'s village at its address (its row's key), for the detail.
    pub fn possible_duplicates_blocking(
        &self,
        station: &str,
        doc: DocumentId,
    ) -> Result<Vec<DocumentId>, StorageError> {
        let Some(row) = self.inner.rows.row(station, doc)?.filter(|r| !r.merged()) else {
            return Ok(Vec::new());
        };
        let same = self.same_address_blocking(station, std::slice::from_ref(&row))?;
        Ok(others_at(&same, &row))
    }

    /// The row of one household of `station`, if it has one.
    pub fn row_blocking(
        &self,
        station: &str,
        doc: DocumentId,
    ) -> Result<Option<HouseholdRow>, StorageError> {
        self.inner.rows.row(station, doc)
    }

    /// The households of `station` merged into `survivor`, for its detail.
    pub fn merged_into_blocking(
        &self,
        station: &str,
        survivor: DocumentId,
    ) -> Result<Vec<HouseholdRow>, StorageError> {
        self.inner.rows.merged_into(station, survivor)
    }

    /// Per village of `villages` (all those of the scope): households, visited in the last
    /// `days` days (server time), never visited, open matters, overdue follow-ups.
    pub fn coverage_blocking(
        &self,
        scope: &ReadingScope,
        villages: &[String],
        days: u32,
        now: Timestamp,
    ) -> Result<Vec<Coverage>, StorageError> {
        let now_ms = now.as_millis() as i64;
        let since = now_ms - i64::from(days) * 86_400_000;
        let mut out: BTreeMap<String, Coverage> = BTreeMap::new();
        for v in villages {
            let c: VillageCounts = self.counts_blocking(scope.station.as_str(), v)?;
            out.insert(
                v.clone(),
                Coverage {
                    village: v.clone(),
                    households: c.households,
                    visited_recently: 0,
                    never_visited: c.households - c.visited,
                    open_matters_total: c.open_matters.values().sum(),
                    open_matters: c.open_matters,
                    follow_ups_todo: c.follow_ups_todo,
                    follow_ups_overdue: 0,
                    quarantined: c.quarantined,
                    visits: c.visits,
                    merged: c.merged,
                    changed_after_merge: c.changed_after_merge,
                },
            );
        }
        // The time-dependent figures cannot be counters.
        let scoped = scope_villages(scope);
        let timed = self.inner.rows.time_counts(
            scope.station.as_str(),
            scoped.as_deref(),
            since,
            now_ms,
        )?;
        for (village, t) in timed {
            if let Some(c) = out.get_mut(&village) {
                c.visited_recently = t.visited_since;
                c.follow_ups_overdue = t.follow_ups_overdue;
            }
        }
        Ok(out.into_values().collect())
    }

    /// The monthly report of `villages` (within `scope`) for `month`, at `offset_minutes`
    /// from UTC, from the rows (see [`super::report`]).
    pub fn monthly_report_blocking(
        &self,
        scope: &ReadingScope,
        villages: &[String],
        month: super::report::Month,
        offset_minutes: i32,
        now: Timestamp,
    ) -> Result<super::report::MonthlyReport, StorageError> {
        let mut report =
            super::report::Builder::new(month, offset_minutes, now.as_millis() as i64, villages);
        let wanted = |row: &HouseholdRow| {
            scope.covers(&row.station, &row.village) && villages.contains(&row.village)
        };
        self.inner.rows.for_each_row_with_visits(
            scope.station.as_str(),
            &wanted,
            &mut |row, visits| {
                report.add(&row, &visits);
                true
            },
        )?;
        Ok(report.finish())
    }

    /// Streams the CSV export (UTF-8 with a byte-order mark, a header row, one row per
    /// visit) of the households within `scope` matching `filter`, in chunks, to `sink`
    /// until it returns `false` (the client went away). Memory stays at one chunk and one
    /// row however large the export. Returns the number of visit rows written.
    pub fn export_blocking(
        &self,
        scope: &ReadingScope,
        filter: &Filter,
        now: Timestamp,
        mut sink: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<usize, StorageError> {
        let now_ms = now.as_millis() as i64;
        let mut buf = Vec::with_capacity(EXPORT_CHUNK_BYTES * 2);
        buf.extend_from_slice("\u{feff}".as_bytes());
        write_csv_row(&mut buf, CSV_HEADER.iter().map(|s| s.to_string()));
        let mut rows_written = 0;
        let mut open = true;
        let wanted = |row: &HouseholdRow| {
            scope.covers(&row.station, &row.village) && filter.matches(row, now_ms)
        };
        self.inner.rows.for_each_row_with_visits(
            scope.station.as_str(),
            &wanted,
            &mut |row, visits| {
                let s = &row.summary;
                let open_matters = s
                    .open_matters
                    .iter()
                    .map(|(k, n)| format!("{k}:{n}"))
                    .collect::<Vec<_>>()
                    .join(";");
                let todo = s.follow_ups_todo();
                for visit in visits {
                    let time = |ms: Option<i64>| {
                        ms.map(|t| Timestamp::from_millis(t.max(0) as u64).to_utc_string())
                            .unwrap_or_default()
                    };
                    let author = visit.author.as_ref();
                    write_csv_row(
                        &mut buf,
                        [
                            row.id.to_string(),
                            row.village.clone(),
                            s.address_label.clone(),
                            s.premises.join(";"),
                            s.review_state.clone(),
                            open_matters.clone(),
                            todo.to_string(),
                            visit.id.clone(),
                            author
                                .map(|a| a.user.clone())
                                .unwrap_or(visit.officer.clone()),
                            author.and_then(|a| a.device.clone()).unwrap_or_default(),
                            time(author.map(|a| a.received_at_ms)),
                            time(visit.started_at_ms),
                            time(visit.ended_at_ms),
                            visit.outcome.clone(),
                            visit.mode.clone(),
                            visit.people_met.join(";"),
                            visit.publicity.join(";"),
                            visit
                                .security_score
                                .map(|s| s.to_string())
                                .unwrap_or_default(),
                            visit
                                .satisfaction
                                .map(|s| s.to_string())
                                .unwrap_or_default(),
                            visit.notes.clone(),
                        ]
                        .into_iter(),
                    );
                    rows_written += 1;
                    if buf.len() >= EXPORT_CHUNK_BYTES {
                        open = sink(std::mem::take(&mut buf));
                        if !open {
                            return false;
                        }
                    }
                }
                true
            },
        )?;
        if open && !buf.is_empty() {
            sink(buf);
        }
        Ok(rows_written)
    }
}

/// The households of `same` at `row`'s village and address, `row` itself left out.
fn others_at(same: &super::store::SameAddress, row: &HouseholdRow) -> Vec<DocumentId> {
    same.get(&(row.village.clone(), row.summary.address_key.clone()))
        .map(|ids| ids.iter().copied().filter(|id| *id != row.id).collect())
        .unwrap_or_default()
}

/// One CSV record (RFC 4180): fields with commas, quotes or line breaks are quoted; a
/// field that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR first) gets
/// a leading apostrophe, since device text is untrusted.
pub(super) fn write_csv_row(buf: &mut Vec<u8>, fields: impl Iterator<Item = String>) {
    for (i, f) in fields.enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let guarded = if f.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{f}")
        } else {
            f
        };
        if guarded.contains([',', '"', '\n', '\r']) {
            buf.push(b'"');
            buf.extend_from_slice(guarded.replace('"', "\"\"").as_bytes());
            buf.push(b'"');
        } else {
            buf.extend_from_slice(guarded.as_bytes());
        }
    }
    buf.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        let mut buf = Vec::new();
        write_csv_row(
            &mut buf,
            ["a,b", "say \"hi\"", "=1+1", "line\nbreak", "鄰長"]
                .iter()
                .map(|s| s.to_string()),
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "\"a,b\",\"say \"\"hi\"\"\",'=1+1,\"line\nbreak\",鄰長\r\n"
        );
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let c = Cursor {
            updated_at_ms: 1_790_000_000_000,
            id: DocumentId::random(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("yesterday"), None);
    }
}
