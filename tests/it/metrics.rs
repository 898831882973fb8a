//! `/metrics` as a monitoring system would scrape it: on its own address only, valid
//! Prometheus text (checked line by line against the exposition format below, histograms
//! included), and its counters move as a phone syncs.

use std::collections::BTreeMap;
use std::process::Stdio;

use fieldsync::client::Device;
use fieldsync::records;

use crate::common::world::AMY;
use crate::common::{household, http, visit, world_via_cli, ServerProcess, StationData};

/// Samples of a valid exposition, `name{labels}` → value; panics on anything that is not.
fn parse(text: &str) -> BTreeMap<String, f64> {
    fn valid_name(n: &str) -> bool {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(valid_name(name), "HELP of a bad name: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#') || line.starts_with("# "), "{line}");
        if line.starts_with('#') {
            continue;
        }
        // name{label="value",...} value
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels not in braces: {line}"));
            let mut rest = inner;
            while !rest.is_empty() {
                let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
                assert!(valid_name(key), "{line}");
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match (escaped, c) {
                        (true, '\\' | '"' | 'n') => escaped = false,
                        (true, _) => panic!("bad escape: {line}"),
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("unterminated label: {line}"));
                rest = after[end + 1..]
                    .strip_prefix(',')
                    .unwrap_or(&after[end + 1..]);
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE before {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "a series twice: {line}"
        );
    }
    // Histograms: buckets never decrease, and +Inf is the count.
    for (family, _) in types.iter().filter(|(_, k)| *k == "histogram") {
        let counts: Vec<(&String, &f64)> = samples
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{family}_count")))
            .collect();
        for (count_series, count) in counts {
            let labels = count_series.trim_start_matches(&format!("{family}_count"));
            let inner = labels.trim_start_matches('{').trim_end_matches('}');
            let mut buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|(k, _)| {
                    k.starts_with(&format!("{family}_bucket{{"))
                        && (inner.is_empty() || k.contains(inner))
                })
                .map(|(k, v)| {
                    let le = k.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    };
                    (le, *v)
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels}: a bucket holds fewer than the one below it"
            );
            assert_eq!(
                buckets.last().map(|b| (b.0, b.1)),
                Some((f64::INFINITY, *count)),
                "{family}{labels}: the +Inf bucket is the count"
            );
        }
    }
    samples
}

async fn scrape(url: &str) -> BTreeMap<String, f64> {
    let body = tokio::task::spawn_blocking({
        let url = url.to_string();
        move || {
            let mut res = ureq::get(&url).call().expect("metrics answer");
            assert_eq!(res.status(), 200);
            let kind = res
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
            res.body_mut().read_to_string().unwrap()
        }
    })
    .await
    .unwrap();
    parse(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_on_their_own_port_and_move_as_a_phone_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let station = StationData::new(dir.path()).await;
    world_via_cli(&station.data).await;
    let server = ServerProcess::start_with(
        &station.data,
        &["--metrics-listen", "127.0.0.1:0"],
        &[],
        Stdio::inherit(),
    )
    .await;
    let metrics = server
        .announcement
        .split_whitespace()
        .find(|w| w.starts_with("http://") && w.ends_with("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {:?}", server.announcement))
        .to_string();
    // Never on the public port.
    let (status, body, _) = http("GET", &format!("{}/metrics", server.http()), None, &[]).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");

    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    amy.set_token(&server.enrol(AMY).await).await.unwrap();
    let before = scrape(&metrics).await;
    let id = amy.create_household(&household("1")).await.unwrap();
    amy.change(id, |tx| {
        records::add_visit(tx, &visit(AMY, "metrics")).map(|_| ())
    })
    .await
    .unwrap();
    // And a household a phone wrote with a malformed visit key: stored, quarantined.
    let odd = amy.create_household(&household("2")).await.unwrap();
    amy.change(odd, |tx| {
        use automerge::transaction::Transactable;
        use automerge::ReadDoc;
        let Some((automerge::Value::Object(automerge::ObjType::Map), visits)) =
            tx.get(automerge::ROOT, "visits")?
        else {
            unreachable!("a household has visits")
        };
        tx.put_object(&visits, "not-a-uuid", automerge::ObjType::Map)?;
        Ok(())
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let after = scrape(&metrics).await;

    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let moved = |k: &str| get(&after, k) - get(&before, k);
    assert!(
        moved("fieldsync_changes_accepted_total") >= 2.0,
        "{after:#?}"
    );
    assert!(moved("fieldsync_accepted_batch_durable_seconds_count") >= 1.0);
    assert!(moved("fieldsync_http_requests_total{route=\"/sync\",status=\"101\"}") >= 1.0);
    assert!(moved("fieldsync_document_loads_total") >= 1.0);
    assert!(moved("fieldsync_quarantined_updates_total") >= 1.0);
    assert!(before.contains_key("fieldsync_connections"));
    assert!(before.contains_key("fieldsync_projection_unsettled_documents"));
    assert!(after.contains_key("fieldsync_documents_loaded_bytes"));
    if station_is_embedded(&server) {
        assert!(moved("fieldsync_store_flushes_total") >= 1.0);
    }
    // A new household's first row is projected from its first batch (its whole history),
    // and a later visit from what its row kept: neither reads the provenance history.
    let history_reads = "fieldsync_projection_history_reads_total";
    assert!(before.contains_key(history_reads), "{before:#?}");
    assert_eq!(moved(history_reads), 0.0, "{after:#?}");
    amy.change(id, |tx| {
        records::add_visit(tx, &visit(AMY, "again")).map(|_| ())
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let later = scrape(&metrics).await;
    assert!(
        get(&later, "fieldsync_changes_accepted_total")
            > get(&after, "fieldsync_changes_accepted_total")
    );
    assert_eq!(get(&later, history_reads), get(&after, history_reads));
    // No label carries an id, a name or a raw path.
    for series in after.keys() {
        assert!(!series.contains(&id.to_string()), "{series}");
        assert!(!series.contains("amy"), "{series}");
    }
    server.kill().await;
}

fn station_is_embedded(server: &ServerProcess) -> bool {
    crate::common::database_args(&server.data).is_empty()
}

/// The checker above refuses what Prometheus would: it is not a test that passes anything.
#[test]
fn the_checker_refuses_broken_expositions() {
    let good = "# HELP x_total a\n# TYPE x_total counter\nx_total{a=\"b\"} 3\n";
    assert_eq!(parse(good)["x_total{a=\"b\"}"], 3.0);
    for bad in [
        "x_total 3\n",                    // no TYPE
        "# TYPE x counter\nx{a=\"b} 1\n", // unterminated label
        "# TYPE x counter\nx 1\nx 2\n",   // a series twice
        "# TYPE x counter\nx one\n",      // not a number
        "# TYPE 1x counter\n1x 1\n",      // bad name
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
    ] {
        let bad = bad.to_string();
        assert!(
            std::panic::catch_unwind(move || parse(&bad)).is_err(),
            "accepted a broken exposition"
        );
    }
}
