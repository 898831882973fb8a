//! The monthly report (issue 15) against a ledger the test keeps of what it wrote: visits on
//! both sides of a month boundary in the station's time zone (UTC+8), a phone with a wrong
//! clock, matters raised in one month and resolved in the next, scores, a suggestion and an
//! overdue follow-up. Every figure of the report is compared with one the test computes
//! from its ledger, not from the server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fieldsync::client::Device;
use fieldsync::ids::{Clock, DocumentId, ManualClock, Timestamp};
use fieldsync::records::{self, MatterKind, MatterStatus, NewHousehold, NewMatter, Risk};
use serde_json::{json, Value};

use crate::common::browser::Browser;
use crate::common::world::{AMY, BEN, CAT, OTHER_VILLAGE, STATION, SUE, SUE_PASSWORD, VILLAGE};
use crate::common::{household, visit, StaffSession, TestServer};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// 2026-11-01T00:00+08:00.
const NOV_START: i64 = 1_793_462_400_000;

/// One visit as the test wrote it.
struct Written {
    village: &'static str,
    household: DocumentId,
    device_ms: i64,
    received_ms: i64,
    outcome: &'static str,
    mode: &'static str,
    satisfaction: Option<u8>,
    security: Option<u8>,
}

/// The month a visit belongs to by the documented rule (data-model.md): the phone's clock
/// unless it is after the receive time (by more than 5 minutes) or more than 31 days
/// before it. `true`: this month (from `start` for `len`).
fn in_month(w: &Written, start: i64, end: i64) -> (bool, bool) {
    let plausible =
        w.device_ms <= w.received_ms + 5 * 60_000 && w.device_ms >= w.received_ms - 31 * DAY;
    let t = if plausible {
        w.device_ms
    } else {
        w.received_ms
    };
    (start <= t && t < end, !plausible)
}

fn in_village(house_no: &str, village: &str) -> NewHousehold {
    let mut h = household(house_no);
    h.station = STATION.into();
    h.village = village.into();
    h.address.village = village.into();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monthly_report_equals_the_ledger_of_what_was_written() {
    // 2026-10-31 22:00 in the station (14:00Z): an hour before the month turns.
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(
        (NOV_START - 2 * HOUR) as u64,
    )));
    let server = TestServer::spawn_with_clock(|_| {}, clock.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let now = || clock.now().as_millis() as i64;
    let mut ledger: Vec<Written> = Vec::new();

    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let amy_url = server.url.clone();
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    let ben_url = server.url_for(BEN).await;
    let cat = Device::open(&dir.path().join("cat")).await.unwrap();
    let cat_url = server.url_for(CAT).await;

    // October, 23:30 local: Amy visits No. 1 and takes a complaint.
    let one = amy
        .create_household(&in_village("1", VILLAGE))
        .await
        .unwrap();
    let at = NOV_START - 30 * 60_000;
    let complaint = amy
        .change(one, move |tx| {
            let mut v = visit(AMY, "October visit");
            v.started_at_ms = at;
            v.satisfaction = Some(2);
            v.security_score = Some(3);
            let v = records::add_visit(tx, &v)?;
            records::add_matter(
                tx,
                &NewMatter {
                    visit: v,
                    kind: MatterKind::Complaint,
                    description: "noise at night".into(),
                    risk: Risk::Yellow,
                    confidential: false,
                },
            )
        })
        .await
        .unwrap();
    clock.advance(Duration::from_millis((90 * 60_000) as u64)); // received 23:30 local
    assert!(amy.sync(&amy_url).await.unwrap().all_held());
    ledger.push(Written {
        village: VILLAGE,
        household: one,
        device_ms: at,
        received_ms: now(),
        outcome: "met",
        mode: "in_home",
        satisfaction: Some(2),
        security: Some(3),
    });

    // Past midnight: November. Amy's second visit (00:10 local, phone offline until 02:00)
    // resolves the complaint.
    let at = NOV_START + 10 * 60_000;
    amy.change(one, move |tx| {
        let mut v = visit(AMY, "November visit");
        v.started_at_ms = at;
        v.satisfaction = Some(5);
        v.security_score = Some(4);
        records::add_visit(tx, &v)?;
        records::update_matter(
            tx,
            &complaint,
            MatterStatus::Resolved,
            AMY,
            at,
            "patrols added",
        )
    })
    .await
    .unwrap();
    clock.advance(Duration::from_millis((150 * 60_000) as u64));
    assert!(amy.sync(&amy_url).await.unwrap().all_held());
    ledger.push(Written {
        village: VILLAGE,
        household: one,
        device_ms: at,
        received_ms: now(),
        outcome: "met",
        mode: "in_home",
        satisfaction: Some(5),
        security: Some(4),
    });

    // Ben's phone thinks it is next year: his November visit counts by the server's time.
    let two = ben
        .create_household(&in_village("2", VILLAGE))
        .await
        .unwrap();
    let at = NOV_START + 400 * DAY;
    ben.change(two, move |tx| {
        let mut v = visit(BEN, "");
        v.started_at_ms = at;
        v.outcome = records::VisitOutcome::NobodyHome;
        v.mode = records::VisitMode::Doorstep;
        v.satisfaction = None;
        v.security_score = None;
        records::add_visit(tx, &v).map(|_| ())
    })
    .await
    .unwrap();
    clock.advance(Duration::from_millis(DAY as u64));
    assert!(ben.sync(&ben_url).await.unwrap().all_held());
    ledger.push(Written {
        village: VILLAGE,
        household: two,
        device_ms: at,
        received_ms: now(),
        outcome: "nobody_home",
        mode: "doorstep",
        satisfaction: None,
        security: None,
    });

    // Dongmen: Cat's visit with a suggestion, a dispute mediated the same month, an
    // overdue follow-up; and a household nobody visited.
    let three = cat
        .create_household(&in_village("3", OTHER_VILLAGE))
        .await
        .unwrap();
    cat.create_household(&in_village("4", OTHER_VILLAGE))
        .await
        .unwrap();
    let at = now() - HOUR;
    let due = now() - 2 * HOUR;
    cat.change(three, move |tx| {
        let mut v = visit(CAT, "street lights");
        v.started_at_ms = at;
        v.satisfaction = Some(4);
        v.security_score = Some(2);
        let v = records::add_visit(tx, &v)?;
        records::add_matter(
            tx,
            &NewMatter {
                visit: v.clone(),
                kind: MatterKind::Suggestion,
                description: "more street lights on the lane".into(),
                risk: Risk::Blue,
                confidential: false,
            },
        )?;
        let d = records::add_matter(
            tx,
            &NewMatter {
                visit: v,
                kind: MatterKind::Dispute,
                description: "parking".into(),
                risk: Risk::Yellow,
                confidential: false,
            },
        )?;
        records::update_matter(tx, &d, MatterStatus::Mediated, CAT, at, "agreed")?;
        records::add_matter(
            tx,
            &NewMatter {
                visit: String::new(),
                kind: MatterKind::Tip,
                description: "the informant Wang Da-ming saw a gambling den".into(),
                risk: Risk::Red,
                confidential: true,
            },
        )?;
        records::add_member(
            tx,
            &records::NewMember {
                name: "陳美玲".into(),
                relation: "head".into(),
                birth_year: Some(1968),
                phone: "0911-000-111".into(),
            },
        )?;
        records::add_follow_up(
            tx,
            &records::NewFollowUp {
                matter: None,
                task: "check the lights".into(),
                owner: CAT.into(),
                due_ms: due,
            },
        )
        .map(|_| ())
    })
    .await
    .unwrap();
    clock.advance(Duration::from_millis(HOUR as u64));
    assert!(cat.sync(&cat_url).await.unwrap().all_held());
    ledger.push(Written {
        village: OTHER_VILLAGE,
        household: three,
        device_ms: at,
        received_ms: now(),
        outcome: "met",
        mode: "in_home",
        satisfaction: Some(4),
        security: Some(2),
    });

    let staff = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    // Staff choose Amy's November notes for the meeting (an officer may not), and choose
    // her October ones and take them back.
    let visit_id = |detail: &Value, notes: &str| -> String {
        detail["visits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["value"]["notes"] == notes)
            .unwrap_or_else(|| panic!("no visit {notes:?} in {detail}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let detail = staff.get_ok(&format!("/households/{one}")).await;
    let (november, october) = (
        visit_id(&detail, "November visit"),
        visit_id(&detail, "October visit"),
    );
    for (visit, mark) in [(&november, true), (&october, true), (&october, false)] {
        let (status, body) = staff
            .send(
                "PUT",
                &format!("/households/{one}/visits/{visit}/meeting"),
                json!({ "for_meeting": mark }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let amy_token = amy_url.split("token=").nth(1).unwrap().to_string();
    let (status, _, _) = crate::common::http(
        "PUT",
        &format!(
            "{}/api/v1/households/{one}/visits/{november}/meeting",
            server.http
        ),
        Some(json!({ "for_meeting": false })),
        &[("authorization", &format!("Bearer {amy_token}"))],
    )
    .await;
    assert_eq!(
        status, 403,
        "an officer does not choose the meeting's notes"
    );
    let detail = staff.get_ok(&format!("/households/{one}")).await;
    assert_eq!(detail["for_meeting"], json!([november.clone()]));

    let report = staff.get_ok("/reports/monthly?month=2026-11").await;
    assert_eq!(report["month"], "2026-11");
    assert_eq!(report["utc_offset"], "+08:00");
    assert_eq!(report["starts_at_ms"], NOV_START);

    // The ledger's figures for November, per village.
    let nov = (NOV_START, NOV_START + 30 * DAY);
    let oct = (NOV_START - 31 * DAY, NOV_START);
    let households: BTreeMap<&str, u64> = [(VILLAGE, 2), (OTHER_VILLAGE, 2)].into();
    for village in [VILLAGE, OTHER_VILLAGE] {
        let mine: Vec<&Written> = ledger.iter().filter(|w| w.village == village).collect();
        let this: Vec<&&Written> = mine
            .iter()
            .filter(|w| in_month(w, nov.0, nov.1).0)
            .collect();
        let before: Vec<&&Written> = mine
            .iter()
            .filter(|w| in_month(w, oct.0, oct.1).0)
            .collect();
        let mut visited: Vec<DocumentId> = this.iter().map(|w| w.household).collect();
        visited.sort();
        visited.dedup();
        let count = |f: &dyn Fn(&Written) -> &'static str| {
            let mut m: BTreeMap<String, u64> = BTreeMap::new();
            for w in &this {
                *m.entry(f(w).to_string()).or_default() += 1;
            }
            json!(m)
        };
        let avg = |ws: &[&&Written], f: &dyn Fn(&Written) -> Option<u8>| -> (Option<f64>, u64) {
            let v: Vec<f64> = ws.iter().filter_map(|w| f(w)).map(f64::from).collect();
            let n = v.len() as u64;
            (
                (n > 0).then(|| (v.iter().sum::<f64>() / n as f64 * 100.0).round() / 100.0),
                n,
            )
        };
        let score = |f: &dyn Fn(&Written) -> Option<u8>| {
            let (a, n) = avg(&this, f);
            let (p, _) = avg(&before, f);
            json!({
                "average": a, "count": n, "previous_average": p,
                "change": a.zip(p).map(|(a, p)| ((a - p) * 100.0).round() / 100.0),
            })
        };
        let got = report["villages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["village"] == village)
            .unwrap_or_else(|| panic!("no {village} in {report}"));
        let h = households[village];
        assert_eq!(got["households"], h, "{village}");
        assert_eq!(got["households_visited"], visited.len(), "{village}");
        assert_eq!(
            got["coverage"],
            json!(((visited.len() as f64 / h as f64) * 100.0).round() / 100.0)
        );
        assert_eq!(got["visits"], this.len(), "{village}");
        assert_eq!(got["visits_by_outcome"], count(&|w| w.outcome), "{village}");
        assert_eq!(got["visits_by_mode"], count(&|w| w.mode), "{village}");
        assert_eq!(
            got["visits_by_server_time"],
            this.iter().filter(|w| in_month(w, nov.0, nov.1).1).count(),
            "{village}"
        );
        assert_eq!(got["satisfaction"], score(&|w| w.satisfaction), "{village}");
        assert_eq!(got["security"], score(&|w| w.security), "{village}");
    }
    // Matters: Linsen's complaint was raised in October and resolved in November; Dongmen
    // raised a suggestion and a dispute in November and mediated the dispute.
    let village = |name: &str| -> Value {
        report["villages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["village"] == name)
            .unwrap()
            .clone()
    };
    let (linsen, dongmen) = (village(VILLAGE), village(OTHER_VILLAGE));
    assert_eq!(linsen["matters_raised"], json!({}));
    assert_eq!(linsen["matters_resolved"], 1);
    assert_eq!(linsen["meeting_notes"].as_array().unwrap().len(), 1);
    assert_eq!(linsen["meeting_notes"][0]["notes"], "November visit");
    assert_eq!(linsen["meeting_notes"][0]["officer"], AMY);
    assert_eq!(linsen["meeting_notes"][0]["household"], one.to_string());
    assert_eq!(
        dongmen["matters_raised"],
        json!({"dispute": 1, "suggestion": 1, "tip": 1})
    );
    assert_eq!(dongmen["matters_mediated"], 1);
    assert_eq!(dongmen["follow_ups_open"], 1);
    assert_eq!(dongmen["follow_ups_overdue"], 1);
    assert_eq!(
        dongmen["suggestions"][0]["text"],
        "more street lights on the lane"
    );
    let station = &report["station"];
    assert_eq!(station["households"], 4);
    assert_eq!(station["visits"], 3);
    assert_eq!(station["matters_resolved"], 1);

    // October: the complaint was raised then, and Amy's first visit is there.
    let october = staff.get_ok("/reports/monthly?month=2026-10").await;
    let linsen = october["villages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["village"] == VILLAGE)
        .unwrap()
        .clone();
    assert_eq!(linsen["visits"], 1);
    assert_eq!(linsen["matters_raised"], json!({"complaint": 1}));
    assert_eq!(linsen["matters_resolved"], 0);

    // The public summary (警務公開): nothing personal of the test data, small counts
    // suppressed, in JSON and CSV.
    let public = staff.get_ok("/reports/public?month=2026-11").await;
    let (status, csv, kind) = staff.get_text("/reports/public.csv?month=2026-11").await;
    assert_eq!((status, kind.as_str()), (200, "text/csv; charset=utf-8"));
    let published = format!("{public}\n{csv}");
    let mut personal: Vec<String> = vec![
        AMY.into(),
        BEN.into(),
        CAT.into(),
        "陳美玲".into(),
        "0911-000-111".into(),
        "Linsen S. Rd".into(),
        "October visit".into(),
        "November visit".into(),
        "street lights".into(),
        "noise at night".into(),
        "parking".into(),
        "Wang Da-ming".into(),
        "gambling".into(),
    ];
    personal.extend([one, two, three].iter().map(|d| d.to_string()));
    for p in &personal {
        assert!(
            !published.contains(p.as_str()),
            "{p:?} is in the public summary: {published}"
        );
    }
    let dongmen_public = public["villages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["village"] == OTHER_VILLAGE)
        .unwrap();
    assert_eq!(dongmen_public["visits"], "<3");
    assert_eq!(dongmen_public["matters_raised"]["tip"], "<3");
    assert_eq!(dongmen_public["satisfaction_average"], Value::Null);
    assert_eq!(public["station"]["visits"], 3);
    assert_eq!(public["station"]["households"], 4);
    assert!(csv.contains("2026-11,station,visits,3"), "{csv}");
    assert!(
        csv.contains(&format!("2026-11,{OTHER_VILLAGE},visits,<3")),
        "{csv}"
    );

    // The report's page: the same figures, and it prints on one A4 page without the
    // navigation or controls.
    let mut b = Browser::launch().await;
    b.sign_in(&server.http, SUE, SUE_PASSWORD).await;
    b.goto(&format!("{}/#/report?month=2026-11", server.http))
        .await;
    b.wait_for("document.querySelector('#main').dataset.view === 'report'")
        .await;
    let shown = b
        .eval(
            r#"[...document.querySelectorAll('#report-table tbody tr')].map(r => [r.dataset.village,
                r.querySelector('[data-col=households]').textContent,
                r.querySelector('[data-col=visits]').firstChild.textContent])"#,
        )
        .await;
    assert_eq!(
        shown,
        json!([
            [OTHER_VILLAGE, "2", "1"],
            [VILLAGE, "2", "2"],
            ["全所合計", "4", "3"]
        ])
    );
    assert_eq!(
        b.eval("document.querySelector('#suggestions li').firstChild.textContent")
            .await,
        "more street lights on the lane"
    );
    assert_eq!(
        b.eval("document.querySelector('#meeting-notes li').firstChild.textContent")
            .await,
        "November visit"
    );
    // Times in the station's zone, whatever the browser's: the month, and the visit at
    // 00:10 on 1 November.
    assert_eq!(
        b.eval("document.querySelector('#report-period').textContent")
            .await,
        "2026-11-01 00:00 – 2026-12-01 00:00 (UTC+08:00)"
    );
    assert!(b
        .eval("document.querySelector('#meeting-notes li').textContent")
        .await
        .as_str()
        .unwrap()
        .contains("2026-11-01 00:10"));
    b.emulate_print(true).await;
    let hidden = b
        .eval("[getComputedStyle(document.querySelector('header#top')).display, getComputedStyle(document.querySelector('.no-print')).display]")
        .await;
    assert_eq!(hidden, json!(["none", "none"]));
    let pdf = b.print_to_pdf().await;
    // FIELDSYNC_WRITE_SCREENSHOTS=1: the printed page as the README shows it (in Chinese).
    if std::env::var_os("FIELDSYNC_WRITE_SCREENSHOTS").is_some() {
        let docs = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
        b.screenshot(&docs.join("screenshots/monthly-report.png"))
            .await;
        std::fs::write(docs.join("monthly-report.pdf"), &pdf).unwrap();
    }
    let text = String::from_utf8_lossy(&pdf);
    let pages = text.matches("/Type /Page").count() - text.matches("/Type /Pages").count();
    assert_eq!(pages, 1, "one page");
    let media = text
        .split("/MediaBox")
        .nth(1)
        .map(|m| m.chars().take(40).collect::<String>())
        .unwrap_or_default();
    // A4 is 595.28 x 841.89 points (Chromium rounds to whole CSS pixels).
    let size: Vec<f64> = media
        .trim()
        .trim_start_matches('[')
        .split(']')
        .next()
        .unwrap()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        size.len() == 4 && (size[2] - 595.28).abs() < 1.0 && (size[3] - 841.89).abs() < 1.0,
        "not A4: {media}"
    );

    // The public summary as a page (警務公開): the same published figures, and none of
    // the personal text.
    b.emulate_print(false).await;
    b.click("#public-page").await;
    b.wait_for("document.querySelector('#main').dataset.view === 'public'")
        .await;
    let shown = b
        .eval(
            r#"[...document.querySelectorAll('#public-table tbody tr')].map(r => [r.dataset.village,
                r.querySelector('[data-col=households]').textContent,
                r.querySelector('[data-col=visits]').textContent])"#,
        )
        .await;
    assert_eq!(
        shown,
        json!([
            [OTHER_VILLAGE, "<3", "<3"],
            [VILLAGE, "<3", "<3"],
            ["全所合計", "4", "3"]
        ])
    );
    let page_text = b.eval("document.querySelector('#main').textContent").await;
    let page_text = page_text.as_str().unwrap();
    for p in &personal {
        assert!(
            !page_text.contains(p.as_str()),
            "{p:?} is on the public page"
        );
    }

    // One village only; bad requests say why.
    let only = staff
        .get_ok(&format!(
            "/reports/monthly?month=2026-11&village={OTHER_VILLAGE}"
        ))
        .await;
    assert_eq!(only["villages"].as_array().unwrap().len(), 1);
    for (query, why) in [
        ("", "`month` is required"),
        ("month=2026-13", "not a month"),
        ("month=2026-11&village=Nowhere", "no village"),
    ] {
        let (status, body) = staff.get(&format!("/reports/monthly?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{query}: {body}"
        );
    }
    server.stop().await;
}
