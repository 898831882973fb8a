//! `fieldsync demo`: a station to look at in a minute. On a fresh data directory it creates a
//! demo station (three villages, three officers with an enrolled phone each, a staff account
//! whose password it prints) and fills it through the real sync path: simulated phones edit
//! offline and sync over loopback, so provenance, catalogs, the staff projection and the
//! conflicts are exactly what real phones would produce. Then the caller serves it.
//! Owns the demo's content and the marker file that tells a demo directory from real data.
//! Must not: write into a directory that holds anything but its own demo, or be mistaken for
//! a real station (the marker keeps the demo password, and says so).

use std::path::{Path, PathBuf};

use automerge::transaction::Transactable;
use automerge::{ObjType, ReadDoc, ROOT};

use crate::accounts::AdminCommand;
use crate::auth::Role;
use crate::client::Device;
use crate::ids::DocumentId;
use crate::records::{
    self, Address, MatterKind, MatterStatus, NewFollowUp, NewHousehold, NewMatter, NewMember,
    NewVisit, Premises, RecordError, Risk, VisitMode, VisitOutcome,
};
use crate::server::Services;

/// In the data directory: the demo's marker, with the staff password (a demo has no secrets).
const MARKER: &str = "demo-station.txt";
/// The first line of a finished demo's marker.
const FINISHED: &str = "fieldsync demo station: made by `fieldsync demo`, not real data";
/// The phones' stores while the demo is made (removed after).
const PHONES: &str = "demo-phones";

pub const STATION: &str = "中正派出所 Zhongzheng Station";
pub const STAFF_USER: &str = "demo-staff";
pub const ADMIN_USER: &str = "demo-admin";
const VILLAGES: [&str; 3] = ["林森里", "東門里", "光華里"];

/// What the data directory holds, for the demo.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing yet: the demo is made there.
    Fresh,
    /// A demo made earlier, with its staff password: it is served as it is.
    Demo { password: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0} holds data that is not a fieldsync demo; the demo needs a new directory (e.g. --data ./fieldsync-demo)")]
    NotADemo(PathBuf),
    #[error("an earlier demo in {0} did not finish; remove that directory and run the demo again")]
    Unfinished(PathBuf),
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("making the demo: {0}")]
    Making(String),
}

/// What `dir` holds: nothing (or only an empty directory), a finished demo, or something else
/// (refused).
pub fn inspect(dir: &Path) -> Result<Found, DemoError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Fresh),
        Err(e) => return Err(DemoError::Io(dir.to_path_buf(), e)),
    };
    if entries.count() == 0 {
        return Ok(Found::Fresh);
    }
    let marker = dir.join(MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(text) => {
            let mut lines = text.lines();
            if lines.next() != Some(FINISHED) {
                return Err(DemoError::Unfinished(dir.to_path_buf()));
            }
            let password = lines
                .find_map(|l| l.strip_prefix("staff password: "))
                .ok_or_else(|| DemoError::Unfinished(dir.to_path_buf()))?;
            Ok(Found::Demo {
                password: password.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(DemoError::NotADemo(dir.to_path_buf()))
        }
        Err(e) => Err(DemoError::Io(marker, e)),
    }
}

/// The demo's accounts, made before it serves: its phones then sync through the server.
pub struct Accounts {
    pub password: String,
    phones: Vec<(&'static str, Device)>,
    marker: PathBuf,
    phones_dir: PathBuf,
}

/// Makes the demo's station, villages and accounts on `services` (not serving yet), with an
/// enrolled phone per officer. The staff account `demo-staff` and the admin `demo-admin`
/// share the returned password.
pub async fn make_accounts(
    services: &Services,
    data_dir: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Accounts, DemoError> {
    let making = |e: &dyn std::fmt::Display| DemoError::Making(e.to_string());
    let marker = data_dir.join(MARKER);
    // Written first: a demo that stops half-way is told from real data, and refused.
    write_private(&marker, "fieldsync demo station: not finished\n")?;
    let password = random_password().map_err(|e| making(&e))?;
    let admin = |cmd: AdminCommand| {
        let services = services.clone();
        async move {
            services
                .accounts
                .admin(&services.hub, cmd, "demo")
                .await
                .map_err(|e| making(&e))
        }
    };

    progress("creating the station, its villages and accounts");
    admin(AdminCommand::StationAdd {
        station: STATION.into(),
    })
    .await?;
    for v in VILLAGES {
        admin(AdminCommand::VillageAdd {
            station: STATION.into(),
            village: v.into(),
        })
        .await?;
    }
    let phc =
        crate::auth::secrets::hash_password(&password, random_salt().map_err(|e| making(&e))?)
            .map_err(|e| making(&e))?;
    for (name, role) in [(STAFF_USER, Role::Staff), (ADMIN_USER, Role::Admin)] {
        admin(AdminCommand::UserAdd {
            name: name.into(),
            role,
            station: STATION.into(),
            villages: Vec::new(),
            password_hash: Some(phc.clone()),
        })
        .await?;
    }
    let officers: [(&'static str, Vec<&str>); 3] = [
        ("wang", vec![VILLAGES[0], VILLAGES[1]]),
        ("lin", vec![VILLAGES[0], VILLAGES[2]]),
        ("chen", vec![VILLAGES[1], VILLAGES[2]]),
    ];
    let phones_dir = data_dir.join(PHONES);
    let mut phones = Vec::new();
    for (name, villages) in &officers {
        admin(AdminCommand::UserAdd {
            name: (*name).into(),
            role: Role::Officer,
            station: STATION.into(),
            villages: villages.iter().map(|v| v.to_string()).collect(),
            password_hash: None,
        })
        .await?;
        let code = admin(AdminCommand::DeviceEnroll {
            user: (*name).into(),
        })
        .await?;
        let code = code.lines().last().unwrap_or_default().trim().to_string();
        let enrolled = services
            .accounts
            .enroll(&code, &format!("{name}'s demo phone"), "127.0.0.1")
            .await
            .map_err(|e| making(&e))?;
        let phone = Device::open(&phones_dir.join(name))
            .await
            .map_err(|e| making(&e))?;
        phone
            .set_token(&enrolled.token)
            .await
            .map_err(|e| making(&e))?;
        phones.push((*name, phone));
    }
    Ok(Accounts {
        password,
        phones,
        marker,
        phones_dir,
    })
}

/// Fills the demo station made by [`make_accounts`] through the server serving at
/// `sync_url` (`ws://…/sync`): the officers' phones record visits offline and sync. Returns
/// the staff password.
pub async fn fill(
    services: &Services,
    made: Accounts,
    sync_url: &str,
    mut progress: impl FnMut(&str),
) -> Result<String, DemoError> {
    let Accounts {
        password,
        phones,
        marker,
        phones_dir,
    } = made;
    let phones: Vec<Phone> = phones
        .into_iter()
        .map(|(officer, device)| Phone {
            officer,
            device,
            url: sync_url.to_string(),
        })
        .collect();
    progress("officers record visits offline, then their phones sync");
    let now = services.accounts.now().as_millis() as i64;
    let day = 86_400_000i64;
    let (wang, lin, chen) = (&phones[0], &phones[1], &phones[2]);

    // 林森里: a family with a phone number two officers changed offline, a dispute in
    // mediation, a complaint, routine visits in Chinese and English.
    let family = wang
        .household(VILLAGES[0], "林森南路", "12", Premises::Home)
        .await?;
    let member = wang
        .edit(family, |tx| {
            records::add_member(
                tx,
                &NewMember {
                    name: "陳美玲".into(),
                    relation: "戶長 head".into(),
                    birth_year: Some(1968),
                    phone: "0911-000-111".into(),
                },
            )
        })
        .await?;
    wang.edit(family, move |tx| {
        let v = records::add_visit(
            tx,
            &visit(
                "wang",
                now - 6 * day,
                "住戶反映夜間有機車在巷口競速，希望加強巡邏。",
                Some(3),
            ),
        )?;
        records::add_matter(
            tx,
            &NewMatter {
                visit: v,
                kind: MatterKind::Complaint,
                description: "夜間機車競速噪音 (late-night motorbike racing at the lane entrance)"
                    .into(),
                risk: Risk::Yellow,
                confidential: false,
            },
        )
        .map(|_| ())
    })
    .await?;
    wang.sync().await?;
    lin.track(family).await?;
    lin.sync().await?;
    // Both officers offline: each writes down the number the resident gave them.
    let m = member.clone();
    wang.edit(family, move |tx| {
        records::set_member_field(tx, &m, "phone", "0911-999-999")
    })
    .await?;
    let m = member.clone();
    lin.edit(family, move |tx| {
        records::set_member_field(tx, &m, "phone", "0922-222-333")?;
        let v = records::add_visit(
            tx,
            &visit(
                "lin",
                now - 2 * day,
                "Follow-up on the noise complaint; the resident says it is quieter since the patrols.",
                Some(4),
            ),
        )?;
        let _ = v;
        Ok(())
    })
    .await?;

    // lin, offline, does not find No. 12 on his phone and registers it again, written his
    // way: the staff page flags the two as one address, to merge.
    let again = lin
        .household(VILLAGES[0], "林森南路 ", "１２ 號", Premises::Home)
        .await?;
    lin.edit(again, move |tx| {
        records::add_visit(
            tx,
            &NewVisit {
                outcome: VisitOutcome::NobodyHome,
                mode: VisitMode::Doorstep,
                people_met: Vec::new(),
                ..visit(
                    "lin",
                    now - 3 * day,
                    "住戶不在，留下聯絡卡。(Nobody home; left a contact card.)",
                    None,
                )
            },
        )
        .map(|_| ())
    })
    .await?;

    let neighbours = lin
        .household(VILLAGES[0], "林森南路", "14", Premises::Home)
        .await?;
    lin.edit(neighbours, move |tx| {
        let v = records::add_visit(
            tx,
            &visit(
                "lin",
                now - 5 * day,
                "與12號住戶因停車位起爭執，雙方同意由里長協調。",
                Some(3),
            ),
        )?;
        let dispute = records::add_matter(
            tx,
            &NewMatter {
                visit: v,
                kind: MatterKind::Dispute,
                description: "停車位糾紛 (parking dispute with No. 12)".into(),
                risk: Risk::Yellow,
                confidential: false,
            },
        )?;
        records::update_matter(
            tx,
            &dispute,
            MatterStatus::InProgress,
            "lin",
            now - 5 * day,
            "調解會 scheduled with the village chief and both households",
        )?;
        records::add_follow_up(
            tx,
            &NewFollowUp {
                matter: Some(dispute),
                task: "Attend the mediation meeting and record the outcome".into(),
                owner: "lin".into(),
                due_ms: now + 3 * day,
            },
        )
        .map(|_| ())
    })
    .await?;

    // 東門里: a confidential tip with an overdue follow-up, a shop, nobody home twice.
    let rental = chen
        .household(VILLAGES[1], "東門街3巷", "5", Premises::Rental)
        .await?;
    chen.edit(rental, move |tx| {
        let v = records::add_visit(
            tx,
            &visit(
                "chen",
                now - 9 * day,
                "Neighbour reports many phones ringing at night in the rental unit upstairs.",
                None,
            ),
        )?;
        let tip = records::add_matter(
            tx,
            &NewMatter {
                visit: v,
                kind: MatterKind::Tip,
                description:
                    "疑似詐騙機房 (suspected fraud call centre); informant asked not to be named"
                        .into(),
                risk: Risk::Red,
                confidential: true,
            },
        )?;
        records::add_follow_up(
            tx,
            &NewFollowUp {
                matter: Some(tip),
                task: "Pass the tip to the criminal investigation unit".into(),
                owner: "chen".into(),
                due_ms: now - 2 * day,
            },
        )
        .map(|_| ())
    })
    .await?;
    let shop = wang
        .household(VILLAGES[1], "東門街", "21", Premises::Shop)
        .await?;
    wang.edit(shop, move |tx| {
        let mut v = visit(
            "wang",
            now - 3 * day,
            "店家詢問如何防範假鈔，已提供宣導單張。",
            Some(5),
        );
        v.people_met = vec!["shop owner".into()];
        let v = records::add_visit(tx, &v)?;
        records::add_matter(
            tx,
            &NewMatter {
                visit: v,
                kind: MatterKind::Consultation,
                description: "如何辨識假鈔 (how to spot counterfeit notes)".into(),
                risk: Risk::Blue,
                confidential: false,
            },
        )
        .map(|_| ())
    })
    .await?;
    let empty = chen
        .household(VILLAGES[1], "東門街", "25", Premises::Home)
        .await?;
    chen.edit(empty, move |tx| {
        let mut first = visit("chen", now - 20 * day, "", None);
        first.outcome = VisitOutcome::NobodyHome;
        first.people_met.clear();
        records::add_visit(tx, &first)?;
        let mut second = visit(
            "chen",
            now - 4 * day,
            "Left a contact card in the mailbox.",
            None,
        );
        second.outcome = VisitOutcome::NobodyHome;
        second.mode = VisitMode::Doorstep;
        second.people_met.clear();
        records::add_visit(tx, &second).map(|_| ())
    })
    .await?;

    // 光華里: a suggestion, an elderly resident, a household never visited yet, and one
    // record a phone wrote with a malformed key (quarantined for staff to look at).
    let elderly = lin
        .household(VILLAGES[2], "光華路", "8", Premises::Home)
        .await?;
    lin.edit(elderly, move |tx| {
        records::add_member(
            tx,
            &NewMember {
                name: "林阿嬤".into(),
                relation: "獨居長者 lives alone".into(),
                birth_year: Some(1941),
                phone: "02-2345-6789".into(),
            },
        )?;
        let v = records::add_visit(
            tx,
            &visit(
                "lin",
                now - day,
                "獨居長者，身體健康；建議里內增設路燈。",
                Some(4),
            ),
        )?;
        records::add_matter(
            tx,
            &NewMatter {
                visit: v,
                kind: MatterKind::Suggestion,
                description: "光華路口增設路燈 (more street lights at the Guanghua Rd crossing)"
                    .into(),
                risk: Risk::Blue,
                confidential: false,
            },
        )
        .map(|_| ())
    })
    .await?;
    chen.household(VILLAGES[2], "光華路", "10", Premises::Home)
        .await?;
    let odd = chen
        .household(VILLAGES[2], "光華路", "12", Premises::Business)
        .await?;
    chen.edit(odd, |tx| {
        let visits = match tx.get(ROOT, "visits")? {
            Some((automerge::Value::Object(ObjType::Map), id)) => id,
            _ => return Err(RecordError::NotAHousehold("no visits map".into())),
        };
        tx.put_object(&visits, "visit-1", ObjType::Map)?;
        Ok(())
    })
    .await?;

    for phone in &phones {
        phone.sync().await?;
    }
    // Once more each, so every phone holds what the others sent (the merged record).
    for phone in &phones {
        phone.sync().await?;
    }
    drop(phones);
    let _ = std::fs::remove_dir_all(&phones_dir);

    write_private(
        &marker,
        &format!(
            "{FINISHED}\nstation: {STATION}\nstaff user: {STAFF_USER} (admin: {ADMIN_USER})\nstaff password: {password}\n"
        ),
    )?;
    progress("done");
    Ok(password)
}

struct Phone {
    officer: &'static str,
    device: Device,
    /// The server's sync URL.
    url: String,
}

impl Phone {
    async fn household(
        &self,
        village: &str,
        street: &str,
        house_no: &str,
        premises: Premises,
    ) -> Result<DocumentId, DemoError> {
        self.device
            .create_household(&NewHousehold {
                station: STATION.into(),
                village: village.into(),
                address: Address {
                    township: "中正區".into(),
                    village: village.into(),
                    group: "1".into(),
                    street: street.into(),
                    house_no: house_no.into(),
                    landmark: String::new(),
                },
                premises,
            })
            .await
            .map_err(|e| DemoError::Making(format!("{}'s phone: {e}", self.officer)))
    }

    async fn edit<T: Send + 'static>(
        &self,
        doc: DocumentId,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<T, RecordError>
            + Send
            + 'static,
    ) -> Result<T, DemoError> {
        self.device
            .change(doc, f)
            .await
            .map_err(|e| DemoError::Making(format!("{}'s phone: {e}", self.officer)))
    }

    async fn track(&self, doc: DocumentId) -> Result<(), DemoError> {
        self.device
            .track(doc)
            .await
            .map_err(|e| DemoError::Making(format!("{}'s phone: {e}", self.officer)))
    }

    async fn sync(&self) -> Result<(), DemoError> {
        let report = self.device.sync(&self.url).await.map_err(|e| {
            DemoError::Making(format!("{}'s phone did not sync: {e}", self.officer))
        })?;
        if !report.all_held() {
            return Err(DemoError::Making(format!(
                "{}'s phone: the server did not hold everything it sent",
                self.officer
            )));
        }
        Ok(())
    }
}

/// A visit by `officer` at `at_ms` (the phone's clock).
fn visit(officer: &str, at_ms: i64, notes: &str, satisfaction: Option<u8>) -> NewVisit {
    NewVisit {
        officer: officer.into(),
        device: format!("{officer}'s demo phone"),
        started_at_ms: at_ms,
        ended_at_ms: at_ms + 20 * 60_000,
        outcome: VisitOutcome::Met,
        mode: VisitMode::InHome,
        people_met: vec!["resident".into()],
        notes: notes.into(),
        publicity: vec!["anti_fraud".into()],
        security_score: satisfaction,
        satisfaction,
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), DemoError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DemoError::Io(path.to_path_buf(), e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| DemoError::Io(path.to_path_buf(), e))
}

fn random_password() -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

fn random_salt() -> Result<[u8; 16], getrandom::Error> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt)?;
    Ok(salt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_directory_or_a_finished_demo_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(inspect(&dir.path().join("missing")).unwrap(), Found::Fresh);
        assert_eq!(inspect(dir.path()).unwrap(), Found::Fresh);
        std::fs::write(dir.path().join("db"), b"real data").unwrap();
        assert!(matches!(inspect(dir.path()), Err(DemoError::NotADemo(_))));
        write_private(
            &dir.path().join(MARKER),
            "fieldsync demo station: not finished\n",
        )
        .unwrap();
        assert!(matches!(inspect(dir.path()), Err(DemoError::Unfinished(_))));
        write_private(
            &dir.path().join(MARKER),
            &format!("{FINISHED}\nstaff password: abc\n"),
        )
        .unwrap();
        assert_eq!(
            inspect(dir.path()).unwrap(),
            Found::Demo {
                password: "abc".into()
            }
        );
    }
}
