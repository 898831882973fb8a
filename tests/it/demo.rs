//! `fieldsync demo` as a new user meets it: one command on an empty directory, then the
//! staff page in a real browser with the password it printed shows a populated station and
//! the phone number two officers changed offline. A directory holding anything else is
//! refused in one line; the demo's own directory is served again as it is.

use std::process::Stdio;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::browser::Browser;
use crate::common::WAIT;

/// Starts `fieldsync demo` on `data`; returns the process, the staff page's URL and the
/// printed password once it says the demo is ready.
async fn start_demo(data: &std::path::Path) -> (tokio::process::Child, String, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .args(["demo", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("FIELDSYNC_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the fieldsync binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the demo prints its page and password")
            .unwrap()
            .expect("a line on stdout")
    };
    let first = next().await;
    assert!(first.starts_with("fieldsync listening on ws://"), "{first}");
    let second = next().await;
    // "staff page: http://ADDR/ (sign in as demo-staff with password PW; demo-admin ...)"
    let page = second
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no page URL in {second:?}"))
        .trim_end_matches('/')
        .to_string();
    let password = second
        .split_once("with password ")
        .and_then(|(_, rest)| rest.split([';', ')']).next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no password in {second:?}"));
    assert!(second.contains("sign in as demo-staff"), "{second}");
    (child, page, password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_a_populated_station_with_the_printed_password() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let (mut child, page, password) = start_demo(&data).await;

    let mut b = Browser::launch().await;
    b.sign_in(&page, "demo-staff", &password).await;
    let villages = b
        .eval(
            r#"[...document.querySelectorAll('#coverage tbody tr')].map(r => [r.dataset.village,
                Number(r.querySelector('[data-col=households]').textContent),
                r.querySelector('[data-col=matters]').textContent,
                Number(r.querySelector('[data-col=overdue]').textContent)])"#,
        )
        .await;
    let villages = villages.as_array().unwrap().clone();
    assert_eq!(villages.len(), 3, "{villages:?}");
    assert!(
        villages.iter().all(|v| v[1].as_i64().unwrap() > 0),
        "every village has households: {villages:?}"
    );
    assert!(
        villages.iter().any(|v| v[3].as_i64().unwrap() > 0),
        "an overdue follow-up shows: {villages:?}"
    );

    // The household whose phone two officers changed offline: both numbers, both officers.
    let contested = b
        .eval("fetch('/api/v1/households?conflicts=true').then(r => r.json()).then(j => j.households.map(h => h.id))")
        .await;
    let contested = contested.as_array().unwrap().clone();
    assert_eq!(contested.len(), 1, "{contested:?}");
    let id = contested[0].as_str().unwrap().to_string();
    b.goto(&format!("{page}/#/household/{id}")).await;
    b.wait_for("document.querySelector('#main').dataset.view === 'detail' && document.querySelectorAll('#conflicts tr[data-path$=\".phone\"]').length === 2")
        .await;
    let phones = b
        .eval("[...document.querySelectorAll('#conflicts tr[data-path$=\".phone\"]')].map(r => [r.querySelector('.value').textContent, r.querySelector('.author').textContent]).sort()")
        .await;
    assert_eq!(
        phones,
        json!([["0911-999-999", "wang"], ["0922-222-333", "lin"]])
    );
    // lin registered the same address again offline: the page offers to merge the two.
    b.wait_for("document.querySelector('#duplicates button.merge')")
        .await;
    child.kill().await.unwrap();

    // Run again on the same directory: the same demo is served, with the same password.
    let (mut again, _, password_again) = start_demo(&data).await;
    assert_eq!(password_again, password);
    again.kill().await.unwrap();
}

#[tokio::test]
async fn the_demo_refuses_a_directory_that_holds_other_data() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("records.db"), b"a station's real data").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .args(["demo", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not a fieldsync demo"), "{err}");
    // Nothing was written.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("records.db")]);
}
