//! The monthly report for the 警民懇談會 (police–community meeting), per village and for the
//! station, computed from projection rows only (never by loading documents). Owns the
//! report's rules: which month a visit or a matter falls in, what counts as resolved that
//! month, how scores are averaged. Pure: rows in, report out; the caller reads the rows.
//!
//! Times. The month boundaries follow the station's UTC offset. A visit falls in the month
//! of its device start time when that clock is plausible (not after the server received
//! the visit, give or take five minutes, and not more than 31 days before), and otherwise in
//! the month the server received it: device clocks are not evidence (data-model.md), but an
//! officer offline for days still visited when the phone says. Matters count in the month
//! the server received them; "resolved, mediated, referred that month" is a matter whose
//! current status is that and was set (received) that month. Follow-ups open and overdue are
//! as of when the report is made.
//!
//! Must not: read documents, or show a confidential matter's description.

use std::collections::BTreeMap;

use serde::Serialize;

use super::HouseholdRow;
use crate::records::VisitRow;

/// How far a device clock may run ahead of the server's receive time and still be believed.
const CLOCK_AHEAD_MS: i64 = 5 * 60 * 1000;
/// How long before the server received it a visit may have happened by its device clock.
const OFFLINE_MAX_MS: i64 = 31 * 86_400_000;

/// A calendar month.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Month {
    pub year: i32,
    /// 1 to 12.
    pub month: u32,
}

impl Month {
    /// `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Month> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let (year, month) = (y.parse().ok()?, m.parse().ok()?);
        ((1970..=9999).contains(&year) && (1..=12).contains(&month))
            .then_some(Month { year, month })
    }

    pub fn previous(self) -> Month {
        if self.month == 1 {
            Month {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Month {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// Its first millisecond, at `offset_minutes` from UTC.
    pub fn start_ms(self, offset_minutes: i32) -> i64 {
        days_from_civil(self.year, self.month, 1) * 86_400_000 - i64::from(offset_minutes) * 60_000
    }

    /// `[start, end)` in ms since the epoch.
    pub fn bounds(self, offset_minutes: i32) -> (i64, i64) {
        (
            self.start_ms(offset_minutes),
            self.next().start_ms(offset_minutes),
        )
    }

    pub fn label(self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }
}

/// Days from 1970-01-01 to the date (proleptic Gregorian; H. Hinnant's algorithm).
fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// When a visit happened, for the report: its device start time when plausible, else the
/// server's receive time. `(time, by_server_time)`.
pub fn visit_time(v: &VisitRow) -> Option<(i64, bool)> {
    let received = v.author.as_ref().map(|a| a.received_at_ms);
    match (v.started_at_ms, received) {
        (Some(device), Some(server)) => {
            if device <= server + CLOCK_AHEAD_MS && device >= server - OFFLINE_MAX_MS {
                Some((device, false))
            } else {
                Some((server, true))
            }
        }
        (Some(device), None) => Some((device, false)),
        (None, Some(server)) => Some((server, true)),
        (None, None) => None,
    }
}

/// An average with how many values made it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Score {
    pub average: Option<f64>,
    pub count: u64,
    /// The previous month's average, and this one minus it.
    pub previous_average: Option<f64>,
    pub change: Option<f64>,
}

/// A resident's suggestion raised that month.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Suggestion {
    pub household: String,
    pub address_label: String,
    pub text: String,
}

/// A visit's notes staff chose for the meeting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeetingNote {
    pub household: String,
    pub address_label: String,
    /// The account that delivered the visit (else what the phone said).
    pub officer: String,
    /// When it happened, by the report's rule (see [`visit_time`]).
    pub at_ms: i64,
    pub notes: String,
}

/// One village's month (or the station's, summed).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MonthFigures {
    /// Households registered to it (quarantined ones are left out, as in the lists).
    pub households: u64,
    pub households_visited: u64,
    /// `households_visited / households`.
    pub coverage: Option<f64>,
    pub visits: u64,
    pub visits_by_outcome: BTreeMap<String, u64>,
    pub visits_by_mode: BTreeMap<String, u64>,
    /// Visits placed by the server's receive time (their device clock was implausible).
    pub visits_by_server_time: u64,
    pub matters_raised: BTreeMap<String, u64>,
    pub matters_resolved: u64,
    pub matters_mediated: u64,
    pub matters_referred: u64,
    /// As of when the report is made.
    pub follow_ups_open: u64,
    pub follow_ups_overdue: u64,
    pub satisfaction: Score,
    pub security: Score,
    pub suggestions: Vec<Suggestion>,
    /// Visits of the month whose notes staff chose for the meeting, in time order.
    pub meeting_notes: Vec<MeetingNote>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VillageMonth {
    pub village: String,
    #[serde(flatten)]
    pub figures: MonthFigures,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MonthlyReport {
    pub month: String,
    /// The station's offset from UTC the month follows, e.g. `+08:00`.
    pub utc_offset: String,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub made_at_ms: i64,
    pub villages: Vec<VillageMonth>,
    pub station: MonthFigures,
}

/// Sums of scores in a month.
#[derive(Default)]
struct Sums {
    satisfaction: (i64, u64),
    security: (i64, u64),
    prev_satisfaction: (i64, u64),
    prev_security: (i64, u64),
}

/// Builds the report from `rows` (every household of the villages wanted, with its visits).
pub struct Builder {
    month: Month,
    offset_minutes: i32,
    now_ms: i64,
    villages: BTreeMap<String, (MonthFigures, Sums)>,
}

impl Builder {
    /// `villages`: every village to report on (a village without households still shows).
    pub fn new(month: Month, offset_minutes: i32, now_ms: i64, villages: &[String]) -> Self {
        Builder {
            month,
            offset_minutes,
            now_ms,
            villages: villages
                .iter()
                .map(|v| (v.clone(), Default::default()))
                .collect(),
        }
    }

    pub fn add(&mut self, row: &HouseholdRow, visits: &[VisitRow]) {
        // Merged households' entries are counted in their survivor.
        if !row.listed() {
            return;
        }
        let Some((f, sums)) = self.villages.get_mut(&row.village) else {
            return;
        };
        let (start, end) = self.month.bounds(self.offset_minutes);
        let (pstart, pend) = self.month.previous().bounds(self.offset_minutes);
        let within = |t: i64| start <= t && t < end;
        f.households += 1;
        let mut visited = false;
        for v in visits {
            let Some((t, by_server)) = visit_time(v) else {
                continue;
            };
            let add_score = |slot: &mut (i64, u64), s: Option<i64>| {
                if let Some(s) = s.filter(|s| (1..=5).contains(s)) {
                    slot.0 += s;
                    slot.1 += 1;
                }
            };
            if within(t) {
                visited = true;
                f.visits += 1;
                *f.visits_by_outcome.entry(v.outcome.clone()).or_default() += 1;
                *f.visits_by_mode.entry(v.mode.clone()).or_default() += 1;
                if by_server {
                    f.visits_by_server_time += 1;
                }
                add_score(&mut sums.satisfaction, v.satisfaction);
                add_score(&mut sums.security, v.security_score);
                if v.for_meeting {
                    f.meeting_notes.push(MeetingNote {
                        household: row.id.to_string(),
                        address_label: row.summary.address_label.clone(),
                        officer: v
                            .author
                            .as_ref()
                            .map(|a| a.user.clone())
                            .unwrap_or_else(|| v.officer.clone()),
                        at_ms: t,
                        notes: v.notes.clone(),
                    });
                }
            } else if pstart <= t && t < pend {
                add_score(&mut sums.prev_satisfaction, v.satisfaction);
                add_score(&mut sums.prev_security, v.security_score);
            }
        }
        if visited {
            f.households_visited += 1;
        }
        for m in &row.summary.matters {
            if m.raised_at_ms.is_some_and(within) {
                *f.matters_raised.entry(m.kind.clone()).or_default() += 1;
                if m.kind == "suggestion" && !m.confidential && !m.description.is_empty() {
                    f.suggestions.push(Suggestion {
                        household: row.id.to_string(),
                        address_label: row.summary.address_label.clone(),
                        text: m.description.clone(),
                    });
                }
            }
            if m.status_set_at_ms.is_some_and(within) {
                match m.status.as_str() {
                    "resolved" => f.matters_resolved += 1,
                    "mediated" => f.matters_mediated += 1,
                    "referred" => f.matters_referred += 1,
                    _ => {}
                }
            }
        }
        for fu in &row.summary.follow_ups {
            if fu.status == "todo" {
                f.follow_ups_open += 1;
                if fu.due_ms.is_some_and(|d| d < self.now_ms) {
                    f.follow_ups_overdue += 1;
                }
            }
        }
    }

    pub fn finish(self) -> MonthlyReport {
        let (starts_at_ms, ends_at_ms) = self.month.bounds(self.offset_minutes);
        let mut station = MonthFigures::default();
        let mut total = Sums::default();
        let mut villages = Vec::new();
        for (village, (mut f, sums)) in self.villages {
            finish_figures(&mut f, &sums);
            add_into(&mut station, &f);
            for (t, s) in [
                (&mut total.satisfaction, sums.satisfaction),
                (&mut total.security, sums.security),
                (&mut total.prev_satisfaction, sums.prev_satisfaction),
                (&mut total.prev_security, sums.prev_security),
            ] {
                t.0 += s.0;
                t.1 += s.1;
            }
            villages.push(VillageMonth {
                village,
                figures: f,
            });
        }
        finish_figures(&mut station, &total);
        let sign = if self.offset_minutes < 0 { '-' } else { '+' };
        let abs = self.offset_minutes.unsigned_abs();
        MonthlyReport {
            month: self.month.label(),
            utc_offset: format!("{sign}{:02}:{:02}", abs / 60, abs % 60),
            starts_at_ms,
            ends_at_ms,
            made_at_ms: self.now_ms,
            villages,
            station,
        }
    }
}

fn average((sum, n): (i64, u64)) -> Option<f64> {
    (n > 0).then(|| round2(sum as f64 / n as f64))
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn score(now: (i64, u64), before: (i64, u64)) -> Score {
    let (average, previous_average) = (average(now), average(before));
    Score {
        average,
        count: now.1,
        previous_average,
        change: average.zip(previous_average).map(|(a, b)| round2(a - b)),
    }
}

fn finish_figures(f: &mut MonthFigures, sums: &Sums) {
    f.meeting_notes
        .sort_by(|a, b| (a.at_ms, &a.household).cmp(&(b.at_ms, &b.household)));
    f.coverage =
        (f.households > 0).then(|| round2(f.households_visited as f64 / f.households as f64));
    f.satisfaction = score(sums.satisfaction, sums.prev_satisfaction);
    f.security = score(sums.security, sums.prev_security);
}

fn add_into(total: &mut MonthFigures, f: &MonthFigures) {
    total.households += f.households;
    total.households_visited += f.households_visited;
    total.visits += f.visits;
    total.visits_by_server_time += f.visits_by_server_time;
    for (k, n) in &f.visits_by_outcome {
        *total.visits_by_outcome.entry(k.clone()).or_default() += n;
    }
    for (k, n) in &f.visits_by_mode {
        *total.visits_by_mode.entry(k.clone()).or_default() += n;
    }
    for (k, n) in &f.matters_raised {
        *total.matters_raised.entry(k.clone()).or_default() += n;
    }
    total.matters_resolved += f.matters_resolved;
    total.matters_mediated += f.matters_mediated;
    total.matters_referred += f.matters_referred;
    total.follow_ups_open += f.follow_ups_open;
    total.follow_ups_overdue += f.follow_ups_overdue;
    total.suggestions.extend(f.suggestions.iter().cloned());
    total.meeting_notes.extend(f.meeting_notes.iter().cloned());
}

/// Counts under this are not published: too few to hide who they are.
pub const PUBLIC_MIN_COUNT: u64 = 3;

/// A published count: the number, or `"<3"` when it is 1 or 2.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Published {
    Count(u64),
    Suppressed(&'static str),
}

impl Published {
    fn of(n: u64) -> Published {
        if n > 0 && n < PUBLIC_MIN_COUNT {
            Published::Suppressed("<3")
        } else {
            Published::Count(n)
        }
    }

    pub fn text(&self) -> String {
        match self {
            Published::Count(n) => n.to_string(),
            Published::Suppressed(s) => (*s).to_string(),
        }
    }
}

/// One village's (or the station's) month as it may be published (警務公開): counts only,
/// small ones suppressed, averages only over enough scores; no names, addresses, phones,
/// notes, descriptions or suggestions' texts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PublicFigures {
    pub households: Published,
    pub households_visited: Published,
    /// Percent, when both counts are published.
    pub coverage_percent: Option<u64>,
    pub visits: Published,
    pub visits_by_outcome: BTreeMap<String, Published>,
    pub visits_by_mode: BTreeMap<String, Published>,
    pub matters_raised: BTreeMap<String, Published>,
    pub matters_resolved: Published,
    pub matters_mediated: Published,
    pub matters_referred: Published,
    pub suggestions: Published,
    /// Averages over at least three scores, else absent.
    pub satisfaction_average: Option<f64>,
    pub security_average: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PublicVillage {
    pub village: String,
    #[serde(flatten)]
    pub figures: PublicFigures,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PublicSummary {
    pub month: String,
    pub utc_offset: String,
    /// Counts of 1 or 2 are shown as `"<3"`.
    pub suppressed_below: u64,
    pub villages: Vec<PublicVillage>,
    pub station: PublicFigures,
}

fn publish(f: &MonthFigures) -> PublicFigures {
    let map = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, n)| (k.clone(), Published::of(*n)))
            .collect()
    };
    let enough = |s: &Score| s.average.filter(|_| s.count >= PUBLIC_MIN_COUNT);
    let coverage_percent = match (
        Published::of(f.households),
        Published::of(f.households_visited),
    ) {
        (Published::Count(h), Published::Count(v)) if h > 0 => Some((v * 100 + h / 2) / h),
        _ => None,
    };
    PublicFigures {
        households: Published::of(f.households),
        households_visited: Published::of(f.households_visited),
        coverage_percent,
        visits: Published::of(f.visits),
        visits_by_outcome: map(&f.visits_by_outcome),
        visits_by_mode: map(&f.visits_by_mode),
        matters_raised: map(&f.matters_raised),
        matters_resolved: Published::of(f.matters_resolved),
        matters_mediated: Published::of(f.matters_mediated),
        matters_referred: Published::of(f.matters_referred),
        suggestions: Published::of(f.suggestions.len() as u64),
        satisfaction_average: enough(&f.satisfaction),
        security_average: enough(&f.security),
    }
}

impl MonthlyReport {
    /// What of this report may be published (see [`PublicFigures`]).
    pub fn public(&self) -> PublicSummary {
        PublicSummary {
            month: self.month.clone(),
            utc_offset: self.utc_offset.clone(),
            suppressed_below: PUBLIC_MIN_COUNT,
            villages: self
                .villages
                .iter()
                .map(|v| PublicVillage {
                    village: v.village.clone(),
                    figures: publish(&v.figures),
                })
                .collect(),
            station: publish(&self.station),
        }
    }
}

impl PublicSummary {
    /// As CSV (UTF-8 with a byte-order mark for spreadsheets): `month,area,figure,value`,
    /// one row per figure, the station's rows last.
    pub fn csv(&self) -> Vec<u8> {
        let mut out = "\u{feff}".as_bytes().to_vec();
        let write = |out: &mut Vec<u8>, fields: [String; 4]| {
            super::query::write_csv_row(out, fields.into_iter())
        };
        write(
            &mut out,
            ["month", "area", "figure", "value"].map(String::from),
        );
        let mut rows = |area: &str, f: &PublicFigures| {
            let mut figures: Vec<(String, String)> = vec![
                ("households".into(), f.households.text()),
                ("households_visited".into(), f.households_visited.text()),
                (
                    "coverage_percent".into(),
                    f.coverage_percent
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                ),
                ("visits".into(), f.visits.text()),
            ];
            for (prefix, m) in [
                ("visits_outcome_", &f.visits_by_outcome),
                ("visits_mode_", &f.visits_by_mode),
                ("matters_raised_", &f.matters_raised),
            ] {
                figures.extend(m.iter().map(|(k, n)| (format!("{prefix}{k}"), n.text())));
            }
            figures.extend([
                ("matters_resolved".into(), f.matters_resolved.text()),
                ("matters_mediated".into(), f.matters_mediated.text()),
                ("matters_referred".into(), f.matters_referred.text()),
                ("suggestions".into(), f.suggestions.text()),
                (
                    "satisfaction_average".into(),
                    f.satisfaction_average
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                ),
                (
                    "security_average".into(),
                    f.security_average
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                ),
            ]);
            for (figure, value) in figures {
                write(
                    &mut out,
                    [self.month.clone(), area.to_string(), figure, value],
                );
            }
        };
        for v in &self.villages {
            rows(&v.village, &v.figures);
        }
        rows("station", &self.station);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_counts_are_not_published() {
        assert_eq!(Published::of(0), Published::Count(0));
        assert_eq!(Published::of(1), Published::Suppressed("<3"));
        assert_eq!(Published::of(2), Published::Suppressed("<3"));
        assert_eq!(Published::of(3), Published::Count(3));
        let f = MonthFigures {
            households: 10,
            households_visited: 2,
            satisfaction: Score {
                average: Some(4.5),
                count: 2,
                ..Score::default()
            },
            ..MonthFigures::default()
        };
        let p = publish(&f);
        assert_eq!(p.households_visited, Published::Suppressed("<3"));
        assert_eq!(
            p.coverage_percent, None,
            "a share would give the small count away"
        );
        assert_eq!(p.satisfaction_average, None);
    }

    #[test]
    fn months_start_at_local_midnight() {
        let nov = Month::parse("2026-11").unwrap();
        // 2026-11-01T00:00+08:00 is 2026-10-31T16:00Z.
        assert_eq!(nov.start_ms(480), 1_793_462_400_000);
        assert_eq!(nov.bounds(0).1 - nov.bounds(0).0, 30 * 86_400_000);
        assert_eq!(Month::parse("2026-12").unwrap().next().label(), "2027-01");
        assert_eq!(
            Month::parse("2026-01").unwrap().previous().label(),
            "2025-12"
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00"] {
            assert!(Month::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_visit_counts_when_its_phone_says_unless_that_clock_is_implausible() {
        let author = |at: i64| crate::records::Author {
            user: "amy".into(),
            device: None,
            received_at_ms: at,
        };
        let v = |device: Option<i64>, server: i64| VisitRow {
            id: "v".into(),
            officer: "amy".into(),
            author: Some(author(server)),
            started_at_ms: device,
            ended_at_ms: None,
            outcome: "met".into(),
            mode: "in_home".into(),
            people_met: vec![],
            publicity: vec![],
            security_score: None,
            satisfaction: None,
            notes: String::new(),
            for_meeting: false,
        };
        let day = 86_400_000;
        let t = 1_793_462_400_000;
        // Offline for three days: the phone's time.
        assert_eq!(
            visit_time(&v(Some(t - 3 * day), t)),
            Some((t - 3 * day, false))
        );
        // A clock in the future, or a year behind: the server's time.
        assert_eq!(visit_time(&v(Some(t + day), t)), Some((t, true)));
        assert_eq!(visit_time(&v(Some(t - 365 * day), t)), Some((t, true)));
        assert_eq!(visit_time(&v(None, t)), Some((t, true)));
    }
}
