//! What a loaded household document costs in memory, against its stored size and its number
//! of operations: the measurement behind the hub's cache cost model (`hub::cache`).
//!
//! ```text
//! cargo run --release --example doc_memory            # 2,000 documents per shape
//! cargo run --release --example doc_memory -- 5000
//! ```
//!
//! For each shape (visits per household) it saves N households, loads them all back the way
//! the server does (`load_incremental` of the stored chunks) and reports the growth of the
//! process's resident memory per document, next to the stored bytes and the operation count.
//! Resident memory includes the allocator's overhead, which is what the machine pays.

use automerge::Automerge;
use fieldsync::hub::op_count::count_ops;
use fieldsync::records::{self, Address, NewHousehold, NewVisit, Premises};

fn household(i: usize, visits: usize) -> Vec<u8> {
    let mut doc = Automerge::new();
    let h = NewHousehold {
        station: "Zhongzheng Station".into(),
        village: "Linsen".into(),
        address: Address {
            township: "Zhongzheng".into(),
            village: "Linsen".into(),
            group: (i % 9).to_string(),
            street: "Linsen S. Rd".into(),
            house_no: i.to_string(),
            landmark: String::new(),
        },
        premises: Premises::Home,
    };
    doc.transact(|tx| records::create_household(tx, &h))
        .expect("a household");
    let mut chunks = doc.save();
    for n in 0..visits {
        let heads = doc.get_heads();
        let v = NewVisit {
            officer: "wang".into(),
            device: "phone-a".into(),
            started_at_ms: 1_790_000_000_000 + n as i64 * 60_000,
            ended_at_ms: 1_790_000_600_000 + n as i64 * 60_000,
            outcome: records::VisitOutcome::Met,
            mode: records::VisitMode::InHome,
            people_met: vec!["resident".into()],
            notes: format!("Visit {n}: the resident asked about scam calls; left the anti-fraud leaflet and the station's number."),
            publicity: vec!["anti_fraud".into()],
            security_score: Some(4),
            satisfaction: Some(5),
        };
        doc.transact(|tx| records::add_visit(tx, &v))
            .expect("a visit");
        // Stored as the server stores an accepted change: one incremental chunk each.
        chunks.extend(doc.save_after(&heads));
    }
    chunks
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    if let Some(visits) = args.next().and_then(|a| a.parse().ok()) {
        measure(n, visits);
        return;
    }
    println!(
        "{:>7} {:>10} {:>8} {:>14} {:>12} {:>12}",
        "visits", "stored B", "ops", "resident B", "resident/B", "resident/op"
    );
    // Each shape in a fresh process: memory freed by one shape would hide the next one's.
    let me = std::env::current_exe().expect("own path");
    for visits in [0usize, 4, 20, 50] {
        let status = std::process::Command::new(&me)
            .args([n.to_string(), visits.to_string()])
            .status()
            .expect("runs itself");
        assert!(status.success());
    }
}

fn measure(n: usize, visits: usize) {
    let stored: Vec<Vec<u8>> = (0..n).map(|i| household(i, visits)).collect();
    let bytes = stored.iter().map(Vec::len).sum::<usize>() / n;
    let ops = stored
        .iter()
        .map(|c| count_ops(c).unwrap_or(0))
        .sum::<u64>()
        / n as u64;
    let before = rss_kib();
    let loaded: Vec<Automerge> = stored
        .iter()
        .map(|c| {
            let mut d = Automerge::new();
            d.load_incremental(c).expect("loads");
            d
        })
        .collect();
    let per_doc = (rss_kib().saturating_sub(before) * 1024) as usize / n;
    println!(
        "{visits:>7} {bytes:>10} {ops:>8} {per_doc:>14} {:>12.1} {:>12.1}",
        per_doc as f64 / bytes.max(1) as f64,
        per_doc as f64 / ops.max(1) as f64
    );
    drop(loaded);
}
