//! The projection kept up to date change by change equals one rebuilt from scratch by
//! `reindex`, after randomised sequences of offline edits by two officers, staff actions
//! through the API and syncs in random order (a property test over a real server).

use fieldsync::client::Device;
use fieldsync::ids::DocumentId;
use fieldsync::records::{self, FollowUpStatus, MatterKind, Premises, Risk};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;

use crate::common::world::{AMY, BEN, STATION, SUE, SUE_PASSWORD};
use crate::common::{household, visit, StaffSession, TestServer};

#[derive(Clone, Debug)]
enum Op {
    /// Officer `who` creates a household, syncs it, and the other officer fetches it.
    Create {
        who: usize,
    },
    Visit {
        who: usize,
        hh: usize,
        bad: bool,
    },
    /// Officer `who` corrects the notes and outcome of the household's first visit.
    EditVisit {
        who: usize,
        hh: usize,
        outcome: usize,
    },
    Matter {
        who: usize,
        hh: usize,
        kind: usize,
    },
    Premises {
        who: usize,
        hh: usize,
        which: usize,
    },
    CloseFollowUps {
        who: usize,
        hh: usize,
    },
    Sync {
        who: usize,
    },
    StaffFollowUp {
        hh: usize,
        overdue: bool,
    },
    StaffApprove {
        hh: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let who = 0..2usize;
    let hh = 0..8usize;
    prop_oneof![
        2 => who.clone().prop_map(|who| Op::Create { who }),
        4 => (who.clone(), hh.clone(), proptest::bool::weighted(0.1)).prop_map(|(who, hh, bad)| Op::Visit { who, hh, bad }),
        2 => (who.clone(), hh.clone(), 0..7usize).prop_map(|(who, hh, kind)| Op::Matter { who, hh, kind }),
        2 => (who.clone(), hh.clone(), 0..4usize).prop_map(|(who, hh, outcome)| Op::EditVisit { who, hh, outcome }),
        2 => (who.clone(), hh.clone(), 0..6usize).prop_map(|(who, hh, which)| Op::Premises { who, hh, which }),
        1 => (who.clone(), hh.clone()).prop_map(|(who, hh)| Op::CloseFollowUps { who, hh }),
        3 => who.prop_map(|who| Op::Sync { who }),
        1 => (hh.clone(), any::<bool>()).prop_map(|(hh, overdue)| Op::StaffFollowUp { hh, overdue }),
        1 => hh.prop_map(|hh| Op::StaffApprove { hh }),
    ]
}

struct World {
    server: TestServer,
    devices: [Device; 2],
    urls: [String; 2],
    households: Vec<DocumentId>,
    sue: StaffSession,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        let server = TestServer::spawn().await;
        let dir = tempfile::tempdir().unwrap();
        let amy = Device::open(&dir.path().join("amy")).await.unwrap();
        let ben = Device::open(&dir.path().join("ben")).await.unwrap();
        let urls = [server.url_for(AMY).await, server.url_for(BEN).await];
        let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
        World {
            server,
            devices: [amy, ben],
            urls,
            households: Vec::new(),
            sue,
            _dir: dir,
        }
    }

    fn pick(&self, hh: usize) -> Option<DocumentId> {
        (!self.households.is_empty()).then(|| self.households[hh % self.households.len()])
    }

    async fn sync(&self, who: usize) {
        self.devices[who].sync(&self.urls[who]).await.unwrap();
    }

    async fn run(&mut self, op: &Op) {
        let officer = |who: usize| [AMY, BEN][who];
        match *op {
            Op::Create { who } => {
                let n = self.households.len() + 1;
                let id = self.devices[who]
                    .create_household(&household(&format!("{n}")))
                    .await
                    .unwrap();
                self.sync(who).await;
                let other = 1 - who;
                self.devices[other].track(id).await.unwrap();
                self.sync(other).await;
                self.households.push(id);
            }
            Op::Visit { who, hh, bad } => {
                let Some(id) = self.pick(hh) else { return };
                let name = officer(who);
                self.devices[who]
                    .change(id, move |tx| {
                        let v =
                            records::add_visit(tx, &visit(name, "Talked about the new bus stop."))?;
                        if bad {
                            // A buggy app: the household becomes quarantined.
                            use automerge::transaction::Transactable;
                            use automerge::ReadDoc;
                            let (_, visits) = tx.get(automerge::ROOT, "visits")?.unwrap();
                            let (_, obj) = tx.get(&visits, v.as_str())?.unwrap();
                            tx.put(&obj, "outcome", "partyy")?;
                        }
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
            Op::EditVisit { who, hh, outcome } => {
                let Some(id) = self.pick(hh) else { return };
                let first: Option<String> = self.devices[who]
                    .read(id, |doc| {
                        use automerge::ReadDoc;
                        let (_, visits) = doc.get(automerge::ROOT, "visits").ok()??;
                        doc.keys(&visits).next()
                    })
                    .await
                    .unwrap();
                let Some(visit) = first else { return };
                let name = officer(who);
                self.devices[who]
                    .change(id, move |tx| {
                        records::edit_visit(
                            tx,
                            &visit,
                            &records::VisitEdit {
                                outcome: Some(records::VisitOutcome::ALL[outcome]),
                                notes: Some(format!("Corrected by {name}.")),
                            },
                        )
                    })
                    .await
                    .unwrap();
            }
            Op::Matter { who, hh, kind } => {
                let Some(id) = self.pick(hh) else { return };
                let name = officer(who);
                self.devices[who]
                    .change(id, move |tx| {
                        let v =
                            records::add_visit(tx, &visit(name, "A resident raised something."))?;
                        records::add_matter(
                            tx,
                            &records::NewMatter {
                                visit: v,
                                kind: MatterKind::ALL[kind],
                                description: "Details written at the doorstep.".into(),
                                risk: Risk::Yellow,
                                confidential: false,
                            },
                        )
                        .map(|_| ())
                    })
                    .await
                    .unwrap();
            }
            Op::Premises { who, hh, which } => {
                let Some(id) = self.pick(hh) else { return };
                self.devices[who]
                    .change(id, move |tx| {
                        records::set_premises(tx, Premises::ALL[which])
                    })
                    .await
                    .unwrap();
            }
            Op::CloseFollowUps { who, hh } => {
                let Some(id) = self.pick(hh) else { return };
                let ids: Vec<String> = self.devices[who]
                    .read(id, |doc| {
                        use automerge::ReadDoc;
                        let (_, fus) = doc.get(automerge::ROOT, "follow_ups").unwrap().unwrap();
                        doc.keys(&fus).collect()
                    })
                    .await
                    .unwrap();
                if ids.is_empty() {
                    return;
                }
                self.devices[who]
                    .change(id, move |tx| {
                        for f in &ids {
                            records::update_follow_up(
                                tx,
                                f,
                                &records::FollowUpUpdate {
                                    status: Some(FollowUpStatus::Done),
                                    ..Default::default()
                                },
                            )?;
                        }
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
            Op::Sync { who } => self.sync(who).await,
            Op::StaffFollowUp { hh, overdue } => {
                let Some(id) = self.pick(hh) else { return };
                let now = fieldsync::ids::Timestamp::now().as_millis() as i64;
                let due = if overdue {
                    now - 86_400_000
                } else {
                    now + 86_400_000
                };
                let (status, body) = self
                    .sue
                    .send(
                        "POST",
                        &format!("/households/{id}/follow-ups"),
                        json!({"task": "Visit again", "owner": AMY, "due_ms": due}),
                    )
                    .await;
                assert_eq!(status, 201, "{body}");
            }
            Op::StaffApprove { hh } => {
                let Some(id) = self.pick(hh) else { return };
                let (status, body) = self
                    .sue
                    .send(
                        "POST",
                        &format!("/households/{id}/review"),
                        json!({"state": "approved"}),
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
            }
        }
    }
}

#[test]
fn the_projection_equals_a_rebuild_after_random_syncs_and_edits() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 6,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 4..24), |ops| {
        rt.block_on(async {
            let mut world = World::new().await;
            for op in &ops {
                world.run(op).await;
            }
            world.sync(0).await;
            world.sync(1).await;
            let projection = world.server.services.projection.clone();
            let incremental = {
                let p = projection.clone();
                tokio::task::spawn_blocking(move || p.dump_blocking().unwrap())
                    .await
                    .unwrap()
            };
            // No household's provenance history was read: a first row is projected from
            // its batch (the document's whole history), every later change from the
            // authors its row kept and its own.
            let history_reads = projection.history_reads();
            let rebuilt = tokio::task::spawn_blocking(move || {
                projection.reindex_blocking(|_, _| {}).unwrap();
                projection.dump_blocking().unwrap()
            })
            .await
            .unwrap();
            let households = world.households.len();
            world.server.stop().await;
            prop_assert_eq!(&incremental, &rebuilt);
            prop_assert_eq!(history_reads, 0);
            // Each household has a row (a JSON line of its own; visits and counters are
            // prefixed by their household or village).
            let rows = incremental
                .iter()
                .filter(|line| line.starts_with('{'))
                .count();
            prop_assert_eq!(rows, households);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A change can make an older value current that no summary has cited yet: two officers set
/// a matter's status offline, and the one whose value won then deletes it, uncovering the
/// other's. The row kept no author for that value, so the server reads the household's
/// history for that change (once) and the row equals a rebuild: the status is the other
/// officer's, with the time the server received it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_uncovered_by_a_delete_is_attributed_from_the_history() {
    use automerge::transaction::Transactable;
    use automerge::ReadDoc;
    use records::MatterStatus;

    let mut world = World::new().await;
    world.run(&Op::Create { who: 0 }).await;
    let id = world.households[0];
    world
        .run(&Op::Matter {
            who: 0,
            hh: 0,
            kind: 0,
        })
        .await;
    world.sync(0).await;
    world.sync(1).await;
    let matter: String = world.devices[0]
        .read(id, |doc| {
            let (_, matters) = doc.get(automerge::ROOT, "matters").unwrap().unwrap();
            doc.keys(&matters).next().unwrap()
        })
        .await
        .unwrap();
    // Ben's status first, then Amy's after a visit: her operation counter is higher, so her
    // value wins once both are on the server.
    set_status(&world.devices[1], id, &matter, BEN, MatterStatus::Mediated).await;
    world
        .run(&Op::Visit {
            who: 0,
            hh: 0,
            bad: false,
        })
        .await;
    set_status(
        &world.devices[0],
        id,
        &matter,
        AMY,
        MatterStatus::InProgress,
    )
    .await;
    world.sync(0).await;
    world.sync(1).await;
    let projection = world.server.services.projection.clone();
    let status_now = |p: fieldsync::projection::Projection| {
        tokio::task::spawn_blocking(move || {
            let row = p.household_blocking(STATION, id).unwrap().unwrap();
            let m = row.summary.matters[0].clone();
            (m.status, m.status_set_at_ms)
        })
    };
    assert_eq!(
        status_now(projection.clone()).await.unwrap().0,
        "in_progress",
        "Amy's value won"
    );
    let reads_before = projection.history_reads();
    // The exported counter is process-wide (other tests may move it too): at least this one.
    let metric_before = fieldsync::metrics::PROJECTION_HISTORY_READS.get();

    // Amy, who never saw Ben's value, deletes hers: Ben's is the only one left.
    world.devices[0]
        .change(id, move |tx| {
            let (_, matters) = tx.get(automerge::ROOT, "matters")?.unwrap();
            let (_, obj) = tx.get(&matters, matter.as_str())?.unwrap();
            tx.delete(&obj, "status")?;
            Ok::<_, records::RecordError>(())
        })
        .await
        .unwrap();
    world.sync(0).await;
    let (status, set_at) = status_now(projection.clone()).await.unwrap();
    assert_eq!(status, "mediated", "Ben's value is current again");
    assert_eq!(
        projection.history_reads(),
        reads_before + 1,
        "the row had not cited Ben's change: its history was read once"
    );
    assert!(fieldsync::metrics::PROJECTION_HISTORY_READS.get() > metric_before);

    let incremental = {
        let p = projection.clone();
        tokio::task::spawn_blocking(move || p.dump_blocking().unwrap())
            .await
            .unwrap()
    };
    let rebuilt = {
        let p = projection.clone();
        tokio::task::spawn_blocking(move || {
            p.reindex_blocking(|_, _| {}).unwrap();
            p.dump_blocking().unwrap()
        })
        .await
        .unwrap()
    };
    assert_eq!(incremental, rebuilt);
    let (_, rebuilt_set_at) = status_now(projection).await.unwrap();
    assert!(set_at.is_some());
    assert_eq!(set_at, rebuilt_set_at, "the time Ben's change was received");
    world.server.stop().await;
}

async fn set_status(
    device: &Device,
    id: DocumentId,
    matter: &str,
    by: &'static str,
    status: records::MatterStatus,
) {
    let matter = matter.to_string();
    device
        .change(id, move |tx| {
            records::update_matter(tx, &matter, status, by, 1_790_000_000_000, "")
        })
        .await
        .unwrap()
}
