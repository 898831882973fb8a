//! The staff web page in a real headless Chromium, against a running server with data synced
//! by device clients: sign in, the coverage dashboard, filtering, a household's detail with
//! both officers' visits and a conflicting field, approval then a late device edit, a
//! follow-up created on the page reaching a device, hostile text shown as text, refused
//! requests, the language switch, and the screenshots in the README.

use std::path::PathBuf;

use fieldsync::client::Device;
use fieldsync::records::{self, NewHousehold, Premises};
use serde_json::json;

use crate::common::browser::Browser;
use crate::common::world::{self, AMY, BEN, CAT, DAN, SUE, SUE_PASSWORD};
use crate::common::{
    fetching_device, household, household_with_member, visit_with_complaint, visit_with_new_phone,
    TestServer,
};

const HOSTILE: &str =
    "Resident said: <img src=x onerror=alert(1)> and <script>alert(2)</script> — keep it as text.";

fn in_village(house_no: &str, station: &str, village: &str) -> NewHousehold {
    let mut h = household(house_no);
    h.station = station.into();
    h.village = village.into();
    h.address.village = village.into();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_review_records_in_a_real_browser() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();

    // Linsen: one household, visited by amy and ben offline, each with another phone number.
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let (id, member) = household_with_member(&amy, &server.url, "12").await;
    let ben_url = server.url_for(BEN).await;
    let ben = fetching_device(&dir.path().join("ben"), &ben_url, id).await;
    amy.change(id, {
        let member = member.clone();
        move |tx| {
            visit_with_complaint(tx, AMY, HOSTILE)?;
            records::set_member_field(tx, &member, "phone", "0911-999-999")
        }
    })
    .await
    .unwrap();
    visit_with_new_phone(&ben, id, &member, BEN, "0922-222-333").await;
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    assert!(ben.sync(&ben_url).await.unwrap().all_held());

    // Dongmen: one household never visited (behind its goal). Another station: one household.
    let cat = Device::open(&dir.path().join("cat")).await.unwrap();
    cat.create_household(&in_village("3", world::STATION, world::OTHER_VILLAGE))
        .await
        .unwrap();
    assert!(cat
        .sync(&server.url_for(CAT).await)
        .await
        .unwrap()
        .all_held());
    let dan = Device::open(&dir.path().join("dan")).await.unwrap();
    let foreign = dan
        .create_household(&in_village("9", world::OTHER_STATION, world::VILLAGE))
        .await
        .unwrap();
    assert!(dan
        .sync(&server.url_for(DAN).await)
        .await
        .unwrap()
        .all_held());

    let mut b = Browser::launch().await;
    b.goto(&format!("{}/", server.http)).await;

    // Sign in (Chinese by default).
    b.wait_for("document.querySelector('#signin')").await;
    assert_eq!(b.eval("document.documentElement.lang").await, "zh-Hant");
    b.fill("#signin input[name=name]", SUE).await;
    b.fill("#signin input[name=password]", "wrong password")
        .await;
    b.click("#signin button[type=submit]").await;
    b.wait_for("document.querySelector('#signin-error').textContent === '帳號或密碼錯誤'")
        .await;
    b.fill("#signin input[name=password]", SUE_PASSWORD).await;
    b.click("#signin button[type=submit]").await;
    b.wait_for("document.querySelector('#main').dataset.view === 'dashboard'")
        .await;
    let cookie_visible = b
        .eval("document.cookie.includes('fieldsync_session')")
        .await;
    assert_eq!(cookie_visible, false, "the session cookie is HttpOnly");

    // The dashboard: both villages with the right counts; Dongmen is behind its goal.
    let rows = b
        .eval(
            r#"[...document.querySelectorAll('#coverage tbody tr')].map(r => ({
                village: r.dataset.village,
                households: r.querySelector('[data-col=households]').textContent,
                visited: r.querySelector('[data-col=visited]').textContent,
                never: r.querySelector('[data-col=never]').textContent,
                matters: r.querySelector('[data-col=matters]').textContent,
                behind: r.classList.contains('behind')}))"#,
        )
        .await;
    assert_eq!(
        rows,
        json!([
            {"village": "Dongmen", "households": "1", "visited": "0 (0%)", "never": "1", "matters": "0", "behind": true},
            {"village": "Linsen", "households": "1", "visited": "1 (100%)", "never": "0", "matters": "陳情 1", "behind": false},
        ])
    );
    let shots = std::env::var_os("FIELDSYNC_WRITE_SCREENSHOTS")
        .map(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots"));
    if let Some(dir) = &shots {
        b.screenshot(&dir.join("dashboard.png")).await;
    }

    // Filtering finds the household by text; the export link carries the filter.
    b.click("#nav a[href='#/households']").await;
    b.wait_for("document.querySelector('#main').dataset.view === 'list'")
        .await;
    b.fill("#filters input[name=q]", "s. rd no. 12").await;
    b.click("#filters button[type=submit]").await;
    b.wait_for("location.hash.includes('q=') && document.querySelector('#main').dataset.view === 'list' && document.querySelectorAll('#households tbody tr').length === 1")
        .await;
    let row = b
        .eval("document.querySelector('#households tbody tr').dataset.id")
        .await;
    assert_eq!(row, id.to_string());
    let export = b
        .eval("document.querySelector('#export').getAttribute('href')")
        .await;
    assert_eq!(export, "/api/v1/export.csv?q=s.+rd+no.+12");
    b.click("#households tbody tr a").await;
    b.wait_for("document.querySelector('#main').dataset.view === 'detail'")
        .await;

    // The detail: both officers' visits, the conflicting phone with both values and authors,
    // and the hostile note as plain text (nothing ran, no element was made of it).
    let officers = b
        .eval("[...document.querySelectorAll('#visits li')].map(li => li.dataset.officer).sort()")
        .await;
    assert_eq!(officers, json!([AMY, BEN]));
    let conflict = b
        .eval(&format!(
            "[...document.querySelectorAll('#conflicts tr[data-path=\"members.{member}.phone\"]')].map(r => [r.querySelector('.value').textContent, r.querySelector('.author').textContent]).sort()"
        ))
        .await;
    assert_eq!(
        conflict,
        json!([["0911-999-999", AMY], ["0922-222-333", BEN]])
    );
    let note_shown = b
        .eval(&format!(
            "[...document.querySelectorAll('#visits .notes')].some(n => n.textContent === {})",
            serde_json::to_string(HOSTILE).unwrap()
        ))
        .await;
    assert_eq!(note_shown, true);
    assert_eq!(
        b.eval("document.querySelectorAll('#main img, #main script').length")
            .await,
        0
    );
    assert_eq!(b.eval("window.__alerts.length").await, 0);
    if let Some(dir) = &shots {
        b.screenshot(&dir.join("household.png")).await;
    }

    // Approve; then a late offline edit arrives and the page says what changed.
    b.fill(
        "#review textarea[name=comment]",
        "Checked with the village chief.",
    )
    .await;
    b.click("#approve").await;
    b.wait_for("document.querySelector('#review-state') && document.querySelector('#review-state').textContent === '已核准'")
        .await;
    assert_eq!(
        b.eval("!!document.querySelector('#changed-since')").await,
        false
    );
    ben.change(id, |tx| records::set_premises(tx, Premises::Shop))
        .await
        .unwrap();
    assert!(ben.sync(&ben_url).await.unwrap().all_held());
    // The page fetches the record again (as on any navigation).
    b.eval("window.dispatchEvent(new HashChangeEvent('hashchange'))")
        .await;
    b.wait_for("document.querySelector('#main').dataset.view === 'detail' && document.querySelector('#changed-since')")
        .await;
    assert_eq!(
        b.eval("document.querySelector('#changed-fields').dataset.paths")
            .await,
        "premises"
    );
    assert_eq!(
        b.eval("document.querySelector('#changed-fields').textContent")
            .await,
        "用途"
    );

    // A follow-up created on the page reaches amy's phone at its next sync.
    b.fill(
        "#new-follow-up input[name=task]",
        "Bring the anti-fraud leaflet",
    )
    .await;
    b.fill("#new-follow-up select[name=owner]", AMY).await;
    b.fill("#new-follow-up input[name=due]", "2027-01-15").await;
    b.click("#new-follow-up button[type=submit]").await;
    b.wait_for("document.querySelectorAll('#follow-ups tbody tr').length === 1")
        .await;
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let on_phone = amy
        .read(id, |doc| {
            use automerge::ReadDoc;
            let (_, fus) = doc.get(automerge::ROOT, "follow_ups").unwrap().unwrap();
            let keys: Vec<String> = doc.keys(&fus).collect();
            let (_, fu) = doc.get(&fus, keys[0].as_str()).unwrap().unwrap();
            (
                doc.get(&fu, "task").unwrap().unwrap().0.to_string(),
                doc.get(&fu, "owner").unwrap().unwrap().0.to_string(),
            )
        })
        .await
        .unwrap();
    assert_eq!(
        on_phone,
        (
            "\"Bring the anti-fraud leaflet\"".to_string(),
            format!("\"{AMY}\"")
        )
    );

    // The history opens the record as it was after its first change: the page says so,
    // shows fewer visits, offers no edits, and goes back to the current record.
    let visits_now = b
        .eval("document.querySelectorAll('#visits li').length")
        .await;
    b.click("#history tbody tr a.then").await;
    b.wait_for("document.querySelector('#main').dataset.view === 'detail' && !!document.querySelector('#as-of')")
        .await;
    let then = b
        .eval("({visits: document.querySelectorAll('#visits li').length, review: !!document.querySelector('#review'), newFollowUp: !!document.querySelector('#new-follow-up'), buttons: document.querySelectorAll('#follow-ups button').length})")
        .await;
    assert!(
        then["visits"].as_u64() < visits_now.as_u64(),
        "{then} against {visits_now}"
    );
    assert_eq!(
        (&then["review"], &then["newFollowUp"], &then["buttons"]),
        (&json!(false), &json!(false), &json!(0))
    );
    // And what that version changed from the one before (the first: the address and more).
    let changed = b
        .eval("document.querySelector('#changed-then').textContent")
        .await;
    assert!(changed.as_str().unwrap().contains("address"), "{changed}");
    b.click("#as-of a").await;
    b.wait_for("document.querySelector('#main').dataset.view === 'detail' && !document.querySelector('#as-of') && !!document.querySelector('#review')")
        .await;

    // Staff choose a visit's notes for the meeting from the page.
    b.click("#visits li button.meeting").await;
    b.wait_for("!!document.querySelector('#visits li button.meeting.on')")
        .await;

    // Without the CSRF token, and for another station's record, the API refuses.
    let refused = b
        .eval(&format!(
            r#"Promise.all([
                fetch('/api/v1/households/{id}/review', {{method: 'POST', headers: {{'content-type': 'application/json'}}, body: JSON.stringify({{state: 'rejected'}})}}).then(r => r.status),
                fetch('/api/v1/households/{foreign}').then(r => r.status),
            ])"#
        ))
        .await;
    assert_eq!(refused, json!([403, 404]));
    b.goto(&format!("{}/#/household/{foreign}", server.http))
        .await;
    b.wait_for("document.querySelector('#not-found')").await;

    // English on request.
    b.click("#lang").await;
    b.wait_for("document.querySelector('#nav a').textContent === 'Coverage'")
        .await;
    assert_eq!(b.eval("document.documentElement.lang").await, "en");

    // Sign out: back to the sign-in form, and the session no longer works.
    b.click("#signout").await;
    b.wait_for("document.querySelector('#signin')").await;
    assert_eq!(
        b.eval("fetch('/api/v1/households').then(r => r.status)")
            .await,
        401
    );
    server.stop().await;
}

/// Staff merge one address registered twice on the page: the duplicate banner offers the
/// merge, asks once more, and the survivor then shows both officers' visits (the copied one
/// says where from); the retired household says where it went; a late offline visit to it
/// shows on the dashboard, and the survivor's page copies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_merge_a_duplicate_household_on_the_page() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    let ben_url = server.url_for(BEN).await;
    let survivor = amy.create_household(&household("12號")).await.unwrap();
    amy.change(survivor, |tx| {
        visit_with_complaint(tx, AMY, "amy heard about scooters")
    })
    .await
    .unwrap();
    let retired = ben.create_household(&household(" １２ 號")).await.unwrap();
    ben.change(retired, |tx| {
        visit_with_complaint(tx, BEN, "ben heard it too")
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    assert!(ben.sync(&ben_url).await.unwrap().all_held());

    let mut b = Browser::launch().await;
    b.sign_in(&server.http, SUE, SUE_PASSWORD).await;
    b.goto(&format!("{}/#/household/{survivor}", server.http))
        .await;
    b.wait_for("document.querySelector('#duplicates button.merge')")
        .await;
    // The first click asks; the second merges.
    b.click("#duplicates button.merge").await;
    b.wait_for("document.querySelector('#duplicates button.merge.confirm')")
        .await;
    assert_eq!(
        b.eval("document.querySelectorAll('#visits li').length")
            .await,
        1,
        "nothing merged on the first click"
    );
    b.click("#duplicates button.merge").await;
    b.wait_for("document.querySelectorAll('#visits li').length === 2 && document.querySelector('#merged-from')")
        .await;
    let officers = b
        .eval("[...document.querySelectorAll('#visits li')].map(li => li.dataset.officer).sort()")
        .await;
    assert_eq!(officers, json!([AMY, BEN]));
    let copied = b
        .eval("document.querySelector('#visits li[data-officer=ben] .copied').textContent")
        .await;
    assert!(
        copied.as_str().unwrap().contains(&retired.to_string()[..8]),
        "{copied}"
    );
    assert!(b.eval("!document.querySelector('#duplicates')").await == true);

    // The retired household, opened from the survivor, says where it went.
    b.click("#merged-from li a").await;
    b.wait_for(&format!(
        "document.querySelector('#merged-into') && document.querySelector('#merged-into').dataset.into === '{survivor}'"
    ))
    .await;

    // ben's late offline visit: the dashboard points to it, the survivor's page copies it.
    ben.change(retired, |tx| {
        records::add_visit(tx, &crate::common::visit(BEN, "late"))
    })
    .await
    .unwrap();
    assert!(ben.sync(&ben_url).await.unwrap().all_held());
    b.goto(&format!("{}/#/", server.http)).await;
    b.wait_for("document.querySelector('#main').dataset.view === 'dashboard' && document.querySelector('#coverage a.late')")
        .await;
    b.click("#coverage a.late").await;
    b.wait_for(&format!(
        "document.querySelector('#main').dataset.view === 'list' && document.querySelector('#households tr[data-id=\"{retired}\"]')"
    ))
    .await;
    b.goto(&format!("{}/#/household/{survivor}", server.http))
        .await;
    b.wait_for("document.querySelector('#merged-from li[data-late=\"1\"] button.merge')")
        .await;
    b.click("#merged-from button.merge").await;
    b.wait_for("document.querySelectorAll('#visits li').length === 3 && document.querySelector('#merged-from li[data-late=\"0\"]')")
        .await;
    server.stop().await;
}
