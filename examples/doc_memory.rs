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
use fieldsync::records::{self, samples};

fn household(i: usize, visits: usize) -> Vec<u8> {
    let mut doc = Automerge::new();
    doc.transact(|tx| records::create_household(tx, &samples::household(&i.to_string())))
        .expect("a household");
    let mut chunks = doc.save();
    for n in 0..visits {
        let heads = doc.get_heads();
        let mut v = samples::visit(
            "wang",
            &format!("Visit {n}: the resident asked about scam calls; left the anti-fraud leaflet and the station's number."),
        );
        v.started_at_ms += n as i64 * 60_000;
        v.ended_at_ms += n as i64 * 60_000;
        doc.transact(|tx| records::add_visit(tx, &v))
            .expect("a visit");
        // Stored as the server stores an accepted change: one incremental chunk each.
        chunks.extend(doc.save_after(&heads));
    }
    chunks
}

fn rss_kib() -> u64 {
    fieldsync::server::process_memory_kib(None, "VmRSS:").unwrap_or(0)
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
