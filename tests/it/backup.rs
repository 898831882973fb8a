//! `fieldsync backup`, `backup verify` and `restore` with the real binary, as station IT
//! would run them: a backup taken through the running server while two phones keep writing
//! holds everything acknowledged before it; the restored server answers for it, gets a new
//! storage id, and phones send again what the backup lacks, so nothing is lost. A damaged
//! archive is refused in one line and nothing is written.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fieldsync::client::Device;
use fieldsync::records;

use crate::common::world::{AMY, BEN, SUE, SUE_PASSWORD};
use crate::common::{
    household, visit, world_via_cli, ServerProcess, StaffSession, StationData, WAIT,
};

/// Runs `fieldsync ARGS` to the end; (success, stdout, stderr).
async fn fieldsync(args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
            .args(args)
            .env("FIELDSYNC_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command finishes")
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_phones_write_restores_what_was_held_and_phones_resend_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let station = StationData::new(dir.path()).await;
    world_via_cli(&station.data).await;
    let server = ServerProcess::start(&station.data).await;
    let amy = Arc::new(Device::open(&dir.path().join("amy")).await.unwrap());
    amy.set_token(&server.enrol(AMY).await).await.unwrap();
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    ben.set_token(&server.enrol(BEN).await).await.unwrap();
    let amys = amy.create_household(&household("1")).await.unwrap();
    let bens = ben.create_household(&household("2")).await.unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    assert!(ben.sync(&server.url).await.unwrap().all_held());

    // Both phones keep recording visits, each synced; the notes the server acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let held: Arc<Mutex<Vec<String>>> = Arc::default();
    let ben = Arc::new(ben);
    let writers: Vec<_> = [(amy.clone(), amys, AMY), (ben.clone(), bens, BEN)]
        .into_iter()
        .map(|(phone, doc, officer)| {
            let (url, stop, held) = (server.url.clone(), stop.clone(), held.clone());
            tokio::spawn(async move {
                for n in 0..400 {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let note = format!("{officer}'s visit {n} while the backup runs");
                    let text = note.clone();
                    phone
                        .change(doc, move |tx| {
                            records::add_visit(tx, &visit(officer, &text))
                        })
                        .await
                        .unwrap();
                    if phone.sync(&url).await.unwrap().all_held() {
                        held.lock().unwrap().push(note);
                    }
                }
            })
        })
        .collect();
    // Let it get going, then back up while it writes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while held.lock().unwrap().len() < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer is stuck"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let held_before: Vec<String> = held.lock().unwrap().clone();
    let archive = dir.path().join("station.fsb");
    let mut args = vec!["backup", "--to", archive.to_str().unwrap(), "--data"];
    let data = s(&station.data);
    args.push(&data);
    let (ok, out, err) = fieldsync(&args).await;
    assert!(ok, "backup: {err}{out}");
    assert!(out.contains("backup written to"), "{out}");
    let during = held.lock().unwrap().len();
    stop.store(true, Ordering::Release);
    for w in writers {
        w.await.unwrap();
    }
    let written = held.lock().unwrap().clone();
    // Certainly after the point: Ben's next visit.
    ben.change(bens, |tx| {
        records::add_visit(tx, &visit(BEN, "after the backup"))
    })
    .await
    .unwrap();
    assert!(ben.sync(&server.url).await.unwrap().all_held());
    // Who took everything, when and where to, is in the audit log.
    let audit = crate::common::admin_cli(&station.data, &["audit"], None).await;
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\tbackup\t") && l.contains("station.fsb")),
        "{audit}"
    );
    let (ok, out, err) = fieldsync(&["backup", "verify", archive.to_str().unwrap()]).await;
    assert!(ok && out.contains("the archive is whole"), "{err}{out}");
    server.kill().await;

    // The machine is lost; the archive is restored on another.
    let restored_dir = dir.path().join("restored");
    let (ok, out, err) = fieldsync(&[
        "restore",
        "--from",
        archive.to_str().unwrap(),
        "--data",
        &s(&restored_dir),
    ])
    .await;
    assert!(ok, "restore: {err}{out}");
    let ids: Vec<&str> = out
        .split(|c: char| !c.is_ascii_hexdigit() && c != '-')
        .filter(|w| w.len() == 36)
        .collect();
    assert_eq!(ids.len(), 2, "the new and the old storage id: {out}");
    assert_ne!(ids[0], ids[1], "a restored server gets a new storage id");
    let restored = ServerProcess::start(&restored_dir).await;
    let staff = StaffSession::sign_in(&restored.http(), SUE, SUE_PASSWORD).await;
    // Both households' details, as text.
    let both = async || {
        let mut text = String::new();
        for id in [amys, bens] {
            text += &staff.get_ok(&format!("/households/{id}")).await.to_string();
        }
        text
    };
    let detail = both().await;
    for note in &held_before {
        assert!(
            detail.contains(note),
            "{note:?}, acknowledged before the backup, is missing after the restore"
        );
    }
    let bens_then = staff
        .get_ok(&format!("/households/{bens}"))
        .await
        .to_string();
    assert!(
        !bens_then.contains("after the backup"),
        "the point is the backup's"
    );

    // The phones come back: their tokens hold, and they send what the backup lacked.
    assert!(amy.sync(&restored.url).await.unwrap().all_held());
    assert!(ben.sync(&restored.url).await.unwrap().all_held());
    let detail = both().await;
    for note in &written {
        assert!(detail.contains(note), "{note:?} was lost");
    }
    let bens_now = staff
        .get_ok(&format!("/households/{bens}"))
        .await
        .to_string();
    assert!(bens_now.contains("after the backup"));
    eprintln!(
        "backup test: {} visits held before the backup, {during} when it finished, {} in all",
        held_before.len(),
        written.len()
    );
    restored.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_cut_archive_is_refused_in_one_line_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let station = StationData::new(dir.path()).await;
    world_via_cli(&station.data).await;
    let server = ServerProcess::start(&station.data).await;
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    amy.set_token(&server.enrol(AMY).await).await.unwrap();
    amy.create_household(&household("1")).await.unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let archive = dir.path().join("good.fsb");
    let data = s(&station.data);
    let (ok, _, err) = fieldsync(&["backup", "--to", &s(&archive), "--data", &data]).await;
    assert!(ok, "{err}");
    // A second backup to the same name is refused: archives are never overwritten.
    let (ok, _, err) = fieldsync(&["backup", "--to", &s(&archive), "--data", &data]).await;
    assert!(!ok && err.contains("exists already"), "{err}");
    server.kill().await;

    let good = std::fs::read(&archive).unwrap();
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x20;
    let cases = [
        ("flipped", flipped, "damaged"),
        ("cut", good[..good.len() * 2 / 3].to_vec(), "truncated"),
    ];
    for (name, bytes, why) in cases {
        let path = dir.path().join(format!("{name}.fsb"));
        std::fs::write(&path, bytes).unwrap();
        let (ok, _, err) = fieldsync(&["backup", "verify", &s(&path)]).await;
        assert!(!ok, "{name}: verify accepted it");
        assert_one_reason(&err, why);
        let target = dir.path().join(format!("restored-{name}"));
        let (ok, _, err) =
            fieldsync(&["restore", "--from", &s(&path), "--data", &s(&target)]).await;
        assert!(!ok, "{name}: restore accepted it");
        assert_one_reason(&err, why);
        assert!(
            !target.exists(),
            "{name}: restore wrote {}",
            target.display()
        );
    }
}

/// Progress lines aside, stderr gives one reason, and it names `why`.
fn assert_one_reason(stderr: &str, why: &str) {
    let reasons: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("checked ") && !l.starts_with("restored "))
        .collect();
    assert_eq!(reasons.len(), 1, "{stderr}");
    assert!(reasons[0].contains(why), "{stderr}");
}
