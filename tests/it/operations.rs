//! What docs/operations.md tells station IT to do, done as far as a test can: the systemd
//! unit in deploy/ is accepted by systemd's own checker (Debian's systemd) with its
//! hardening intact.

use std::path::PathBuf;

/// `deploy/fieldsync.service`, its binary path pointed at the one under test (the checker
/// refuses a unit whose program does not exist).
fn unit_under_test(dir: &std::path::Path) -> PathBuf {
    let unit = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/fieldsync.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/fieldsync serve"));
    let path = dir.join("fieldsync.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/fieldsync", env!("CARGO_BIN_EXE_fieldsync")),
    )
    .unwrap();
    path
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    std::process::Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect(
            "systemd-analyze runs (Debian: apt-get install systemd; tests/run-all.sh installs it)",
        )
}

#[test]
fn the_systemd_unit_is_accepted_by_systemd_and_keeps_its_hardening() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let unit_s = unit.display().to_string();
    let out = systemd_analyze(&["verify", &unit_s]);
    // `verify` exits 0 on settings it ignores, and says so on stderr: both must be clean.
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = systemd_analyze(&["security", "--offline=yes", &unit_s]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let exposure: f64 = text
        .split("Overall exposure level for fieldsync.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    // systemd rates 0 (locked down) to 10 (unprotected); "OK" is below 2.
    assert!(exposure < 2.0, "exposure {exposure}: {text}");
}
