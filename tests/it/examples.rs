//! The README's tour, run with the real example binary: two officers' devices enrol with
//! one-time codes, one registers a household, the other discovers it in the village catalog
//! and fetches it, both record visits offline, sync, and both see the merged record.

use std::path::{Path, PathBuf};

use crate::common::{world, TestServer};

/// Plain `cargo test` builds the examples next to the test binaries (target/debug/examples).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} not built; run the suite with `cargo test` (it builds examples)",
        path.display()
    );
    path
}

fn run(device: &Path, server: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(example("officer_device"))
        .arg("--device")
        .arg(device)
        .args(["--server", server])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "officer_device {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_works_with_the_example_device() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("phone-a"), dir.path().join("phone-b"));
    let url = server.sync_base.clone();
    let (code_a, code_b) = (
        server.enrolment_code(world::AMY).await,
        server.enrolment_code(world::BEN).await,
    );
    let merged = tokio::task::spawn_blocking(move || {
        assert!(run(&a, &url, &["enroll", &code_a]).contains("village Linsen"));
        assert!(run(&b, &url, &["enroll", &code_b]).contains("of ben"));
        let household = run(
            &a,
            &url,
            &["new", "--village", "Linsen", "--house-no", "12"],
        );
        let household = household.trim();
        assert!(household.starts_with("automerge:"), "{household}");
        assert!(
            run(&a, &url, &["sync"]).contains("synced: every local change is held by the server")
        );
        // B discovers the household in the village catalog.
        run(&b, &url, &["sync"]);
        let catalog = run(&b, &url, &["catalog"]);
        assert!(catalog.contains(household), "{catalog}");
        run(&b, &url, &["fetch", household]);
        assert!(run(&b, &url, &["sync"]).contains("received changes"));

        run(
            &a,
            &url,
            &[
                "visit",
                household,
                "--officer",
                "wang",
                "--notes",
                "Resident reports scooter theft",
            ],
        );
        run(&a, &url, &["set-premises", household, "rental"]);
        run(
            &b,
            &url,
            &[
                "visit",
                household,
                "--officer",
                "lin",
                "--notes",
                "住戶反映停車糾紛",
            ],
        );
        run(&b, &url, &["set-premises", household, "shop"]);
        assert!(run(&a, &url, &["list"]).contains("local changes not yet synced"));

        for device in [&a, &b, &a] {
            assert!(run(device, &url, &["sync"])
                .contains("synced: every local change is held by the server"));
        }
        (
            run(&a, &url, &["show", household]),
            run(&b, &url, &["show", household]),
        )
    })
    .await
    .unwrap();
    assert_eq!(merged.0, merged.1, "both devices show the same record");
    let view: serde_json::Value = serde_json::from_str(&merged.0).unwrap();
    let notes: Vec<&str> = view["visits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["notes"].as_str().unwrap())
        .collect();
    assert!(notes.contains(&"Resident reports scooter theft"));
    assert!(notes.contains(&"住戶反映停車糾紛"));
    let mut premises: Vec<&str> = view["premises"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    premises.sort();
    assert_eq!(premises, vec!["rental", "shop"]);
    server.stop().await;
}

/// The station report example prints the coverage table and the open matters, signing in
/// with a password on stdin; the JS example writes a household with the stock client that
/// the server accepts as conforming (strings as JS text) and lists with its matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_example_writes_a_conforming_household_and_the_report_shows_it() {
    let server = TestServer::spawn().await;
    let token = server.enrol(world::AMY).await;
    let js = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/js");
    let out = tokio::time::timeout(
        crate::common::WAIT * 2,
        tokio::process::Command::new("node")
            .arg(js.join("write_household.mjs"))
            .arg(&server.http)
            .arg(&token)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the JS example finishes")
    .expect("node runs");
    assert!(
        out.status.success(),
        "write_household.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let url = line["url"].as_str().unwrap().to_string();

    let sue =
        crate::common::StaffSession::sign_in(&server.http, world::SUE, world::SUE_PASSWORD).await;
    let list = sue.get_ok("/households").await;
    assert_eq!(list["total"], 1, "conforming, so not quarantined: {list}");
    assert_eq!(list["households"][0]["url"], url.as_str());
    assert_eq!(list["households"][0]["open_matters"]["consultation"], 1);
    assert_eq!(list["households"][0]["officers"][0], world::AMY);
    let detail = sue.get_ok(&format!("/households/{url}")).await;
    assert_eq!(detail["quarantine"], serde_json::json!([]));
    assert_eq!(
        detail["visits"][0]["value"]["notes"],
        "Asked how to recognise fake investment calls; left the 165 leaflet."
    );

    let http = server.http.clone();
    let report = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(example("station_report"))
            .args(["--server", &http, "--user", world::SUE])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{}", world::SUE_PASSWORD).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "station_report failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap();
    let linsen = report
        .lines()
        .find(|l| l.starts_with("Linsen"))
        .unwrap_or_else(|| panic!("no Linsen row: {report}"));
    let cells: Vec<&str> = linsen.split_whitespace().collect();
    assert_eq!(&cells[..4], ["Linsen", "1", "1", "(100%)"], "{report}");
    assert!(
        report.contains("Zhongzheng Linsen 5 Nanhai Rd No. 21 (Linsen)"),
        "{report}"
    );
    assert!(
        report.contains("consultation [new, risk yellow] by amy: Wants a call back about a suspicious investment group chat."),
        "{report}"
    );
    server.stop().await;
}
