//! Admin commands (`fieldsync admin …`): what each does to the directory, its audit entry,
//! and its printed answer. The same code runs in the server (reached over the admin socket)
//! and in the CLI process when no server holds the data directory. Must not print secrets
//! except the one thing a command exists to hand out (an enrolment code), and must not write
//! them to the audit log.

use crate::auth::directory::{Enrolment, Op, Station, User, Village};
use crate::auth::secrets::{self, SecretHash};
use crate::auth::{DeviceId, Record, RecordKey, Role, StationId, UserName, VillageName};
use crate::hub::Hub;
use crate::ids::{DocumentId, Timestamp};
use crate::storage::{blocking, StorageError};

use super::{random_bytes, Accounts, AccountsError};

/// One admin command, as the CLI sends it over the admin socket (JSON, tagged by `command`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminCommand {
    StationAdd {
        station: String,
    },
    VillageAdd {
        station: String,
        village: String,
    },
    UserAdd {
        name: String,
        role: Role,
        station: String,
        villages: Vec<String>,
        /// An argon2id PHC string made by the CLI: the password itself never leaves the
        /// operator's terminal.
        password_hash: Option<String>,
    },
    UserDisable {
        name: String,
    },
    UserList,
    DeviceEnroll {
        user: String,
    },
    DeviceList,
    DeviceRevoke {
        device: String,
    },
    Audit {
        limit: usize,
    },
    /// A backup of everything into `to` (an absolute path on the server's machine). Not an
    /// account command: the server runs it (`backup::take`); it travels the admin socket so
    /// that a running server, which holds the store, can take it.
    Backup {
        to: String,
    },
}

/// One line of the admin audit log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: Timestamp,
    /// Who ran it: `cli:<unix user>`.
    pub operator: String,
    pub action: String,
    pub detail: String,
}

fn invalid(e: impl std::fmt::Display) -> AccountsError {
    AccountsError::Invalid(e.to_string())
}

impl Accounts {
    /// Runs one admin command and returns what to print. Changes are durable and in effect
    /// (connections of a revoked device are closed) when this returns.
    pub async fn admin(
        &self,
        hub: &Hub,
        cmd: AdminCommand,
        operator: &str,
    ) -> Result<String, AccountsError> {
        let op = operator.to_string();
        match cmd {
            AdminCommand::StationAdd { station } => {
                let station = StationId::new(&station).map_err(invalid)?;
                let s2 = station.clone();
                self.commit(
                    move |dir, now| {
                        if dir.station(&s2).is_some() {
                            return Err(AccountsError::Conflict(format!(
                                "station {s2} already exists"
                            )));
                        }
                        Ok((
                            vec![Op::Put(Record::Station(Station {
                                name: s2,
                                created_at: now,
                            }))],
                            (),
                        ))
                    },
                    Some((op, "station add".into(), format!("station={station}"))),
                )
                .await?;
                Ok(format!("station {station} added"))
            }
            AdminCommand::VillageAdd { station, village } => {
                let station = StationId::new(&station).map_err(invalid)?;
                let village = VillageName::new(&village).map_err(invalid)?;
                {
                    let exists = self.with_directory(|d| {
                        (
                            d.station(&station).is_some(),
                            d.village(&station, &village).is_some(),
                        )
                    });
                    match exists {
                        (false, _) => {
                            return Err(AccountsError::NotFound(format!(
                                "no station {station}; add it first with `fieldsync admin station add {station}`"
                            )))
                        }
                        (true, true) => {
                            return Err(AccountsError::Conflict(format!(
                                "village {village} already exists in station {station}"
                            )))
                        }
                        _ => {}
                    }
                }
                // The catalog document exists (empty of households) before anyone can ask for it.
                let catalog = DocumentId::random();
                let (s, v) = (station.to_string(), village.to_string());
                hub.change_local(
                    catalog,
                    Box::new(move |doc| {
                        crate::records::create_catalog(doc, &s, &v).map_err(|e| e.to_string())
                    }),
                )
                .await
                .map_err(|e| AccountsError::Storage(StorageError::Io(e.to_string())))?;
                let (s2, v2) = (station.clone(), village.clone());
                self.commit(
                    move |dir, now| {
                        if dir.village(&s2, &v2).is_some() {
                            return Err(AccountsError::Conflict(format!(
                                "village {v2} already exists"
                            )));
                        }
                        Ok((
                            vec![Op::Put(Record::Village(Village {
                                station: s2,
                                name: v2,
                                catalog,
                                created_at: now,
                            }))],
                            (),
                        ))
                    },
                    Some((
                        op,
                        "village add".into(),
                        format!("station={station} village={village}"),
                    )),
                )
                .await?;
                Ok(format!(
                    "village {village} added to station {station}; catalog {}",
                    catalog.to_url()
                ))
            }
            AdminCommand::UserAdd {
                name,
                role,
                station,
                villages,
                password_hash,
            } => {
                let name = UserName::new(&name).map_err(invalid)?;
                let station = StationId::new(&station).map_err(invalid)?;
                let villages = villages
                    .iter()
                    .map(|v| VillageName::new(v.trim()))
                    .collect::<Result<std::collections::BTreeSet<_>, _>>()
                    .map_err(invalid)?;
                if let Some(h) = &password_hash {
                    if !h.starts_with("$argon2") {
                        return Err(invalid("password_hash must be an argon2 PHC string"));
                    }
                }
                if role == Role::Officer && villages.is_empty() {
                    return Err(invalid(
                        "an officer needs --villages V1,V2 (villages of their station)",
                    ));
                }
                if role != Role::Officer && !villages.is_empty() {
                    return Err(invalid(
                        "only officers are assigned villages; drop --villages",
                    ));
                }
                if role != Role::Officer && password_hash.is_none() {
                    return Err(invalid(
                        "staff and admins sign in with a password: add --password-stdin",
                    ));
                }
                let detail = format!(
                    "user={name} role={role} station={station} villages={}",
                    villages
                        .iter()
                        .map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                );
                let (n2, s2) = (name.clone(), station.clone());
                self.commit(
                    move |dir, now| {
                        if dir.user(&n2).is_some() {
                            return Err(AccountsError::Conflict(format!("user {n2} already exists")));
                        }
                        if dir.station(&s2).is_none() {
                            return Err(AccountsError::NotFound(format!(
                                "no station {s2}; add it first with `fieldsync admin station add {s2}`"
                            )));
                        }
                        if let Some(v) = villages.iter().find(|v| dir.village(&s2, v).is_none()) {
                            return Err(AccountsError::NotFound(format!(
                                "no village {v} in station {s2}; add it with `fieldsync admin village add {s2} {v}`"
                            )));
                        }
                        let user = User {
                            name: n2,
                            role,
                            station: s2,
                            villages,
                            password: password_hash,
                            disabled: false,
                            created_at: now,
                        };
                        Ok((vec![Op::Put(Record::User(user))], ()))
                    },
                    Some((op, "user add".into(), detail)),
                )
                .await?;
                Ok(format!("user {name} ({role}, station {station}) added"))
            }
            AdminCommand::UserDisable { name } => {
                let name = UserName::new(&name).map_err(invalid)?;
                let n2 = name.clone();
                self.commit(
                    move |dir, _now| {
                        let mut user = dir
                            .user(&n2)
                            .cloned()
                            .ok_or_else(|| AccountsError::NotFound(format!("no user {n2}")))?;
                        user.disabled = true;
                        let mut ops: Vec<Op> = dir
                            .sessions_of(&n2)
                            .into_iter()
                            .map(|s| Op::Remove(RecordKey::Session(s.token.clone())))
                            .collect();
                        ops.push(Op::Put(Record::User(user)));
                        Ok((ops, ()))
                    },
                    Some((op, "user disable".into(), format!("user={name}"))),
                )
                .await?;
                let closed =
                    self.close_connections(|p| p.user == name, "this account has been disabled");
                tracing::info!(user = %name, closed, "user disabled");
                Ok(format!(
                    "user {name} disabled; {closed} open connection(s) closed"
                ))
            }
            AdminCommand::UserList => Ok(self.with_directory(|dir| {
                let mut out = String::from("NAME\tROLE\tSTATION\tVILLAGES\tSTATUS\n");
                for u in dir.users() {
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}\t{}\n",
                        u.name,
                        u.role,
                        u.station,
                        u.villages
                            .iter()
                            .map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                        if u.disabled { "disabled" } else { "active" }
                    ));
                }
                out.trim_end().to_string()
            })),
            AdminCommand::DeviceEnroll { user } => {
                let user = UserName::new(&user).map_err(invalid)?;
                let code = secrets::enrolment_code(random_bytes()?);
                let code_hash = SecretHash::of(&secrets::normalise_code(code.expose()));
                let ttl = self.inner.config.enrolment_code_ttl;
                let u2 = user.clone();
                let expires_at = self
                    .commit(
                        move |dir, now| {
                            let u = dir
                                .user(&u2)
                                .ok_or_else(|| AccountsError::NotFound(format!("no user {u2}")))?;
                            if u.disabled {
                                return Err(AccountsError::Conflict(format!(
                                    "user {u2} is disabled"
                                )));
                            }
                            let expires_at = now.saturating_add(ttl);
                            let mut ops: Vec<Op> =
                                dir.expired(now).into_iter().map(Op::Remove).collect();
                            ops.push(Op::Put(Record::Enrolment(Enrolment {
                                code: code_hash,
                                user: u2,
                                created_at: now,
                                expires_at,
                            })));
                            Ok((ops, expires_at))
                        },
                        Some((op, "device enroll".into(), format!("user={user}"))),
                    )
                    .await?;
                let minutes = ttl.as_secs() / 60;
                Ok(format!(
                    "enrolment code for {user}: works once, expires in {minutes} min ({})\n\
                     enter it in the app, or: POST /api/v1/devices/enroll {{\"code\", \"device_name\"}}\n{}",
                    expires_at.to_utc_string(),
                    code.expose()
                ))
            }
            AdminCommand::DeviceList => Ok(self.with_directory(|dir| {
                let now = self.now();
                let mut out = String::from("DEVICE\tUSER\tNAME\tENROLLED\tSTATUS\n");
                for d in dir.devices() {
                    let status = if d.revoked_at.is_some() {
                        "revoked"
                    } else if d.expires_at.is_some_and(|t| t <= now) {
                        "expired"
                    } else {
                        "active"
                    };
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}\t{}\n",
                        d.id,
                        d.user,
                        d.name.replace(['\t', '\n'], " "),
                        d.enrolled_at.to_utc_string(),
                        status
                    ));
                }
                out.trim_end().to_string()
            })),
            AdminCommand::DeviceRevoke { device } => {
                let device = DeviceId::new(&device).map_err(invalid)?;
                let d2 = device.clone();
                self.commit(
                    move |dir, now| {
                        let mut d = dir.device(&d2).cloned().ok_or_else(|| {
                            AccountsError::NotFound(format!(
                                "no device {d2}; see `fieldsync admin device list`"
                            ))
                        })?;
                        if d.revoked_at.is_none() {
                            d.revoked_at = Some(now);
                        }
                        Ok((vec![Op::Put(Record::Device(d))], ()))
                    },
                    Some((op, "device revoke".into(), format!("device={device}"))),
                )
                .await?;
                let closed = self.close_connections(
                    |p| p.device.as_ref() == Some(&device),
                    "this device has been revoked",
                );
                tracing::info!(device = %device, closed, "device revoked");
                Ok(format!(
                    "device {device} revoked; {closed} open connection(s) closed"
                ))
            }
            AdminCommand::Backup { .. } => Err(AccountsError::Invalid(
                "a backup is taken by the server, not the account directory: run `fieldsync backup --to FILE`".into(),
            )),
            AdminCommand::Audit { limit } => {
                let entries = self.audit(limit).await?;
                let mut out = String::from("SEQ\tAT\tOPERATOR\tACTION\tDETAIL\n");
                for e in entries {
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}\t{}\n",
                        e.seq,
                        e.at.to_utc_string(),
                        e.operator,
                        e.action,
                        e.detail
                    ));
                }
                Ok(out.trim_end().to_string())
            }
        }
    }

    /// The latest `limit` audit entries, oldest first.
    pub async fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, AccountsError> {
        let store = self.inner.store.clone();
        Ok(blocking(move || store.audit(limit)).await?)
    }
}
