//! A station's morning report through the staff API: the coverage table per village, then
//! every household with open matters and what they are. Signs in as a staff member (password
//! on stdin, never on the command line) or uses a device token, and only reads.
//!
//! ```text
//! echo "$PASSWORD" | cargo run --example station_report -- --server http://127.0.0.1:8080 --user sue
//! cargo run --example station_report -- --server http://127.0.0.1:8080 --token fsd_...
//! ```
//! The HTTP calls it makes are documented in proto-docs/http-api.md.

use std::io::BufRead;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;

#[derive(Parser)]
#[command(about = "Print the coverage table and the open matters of a station")]
struct Cli {
    /// The server's HTTP address.
    #[arg(long, env = "FIELDSYNC_HTTP", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// A staff account; its password is read from stdin.
    #[arg(long, conflicts_with = "token")]
    user: Option<String>,
    /// A device token instead (an officer sees only their villages).
    #[arg(long, env = "FIELDSYNC_TOKEN")]
    token: Option<String>,
    /// "Visited recently" means within this many days.
    #[arg(long, default_value_t = 30)]
    days: u32,
}

struct Api {
    base: String,
    agent: ureq::Agent,
    /// `Cookie` or `Authorization` header.
    credential: (&'static str, String),
}

impl Api {
    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .header(self.credential.0, &self.credential.1)
            .call()
            .with_context(|| format!("cannot reach {url}; is the server running?"))?;
        let status = resp.status().as_u16();
        let body = read_json(&mut resp);
        if status != 200 {
            bail!(
                "GET {path} answered {status}: {}",
                body["error"]["message"].as_str().unwrap_or("(no message)")
            );
        }
        Ok(body)
    }
}

fn read_json(resp: &mut ureq::http::Response<ureq::Body>) -> Value {
    resp.body_mut()
        .read_to_string()
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(60)))
        .build()
        .into();
    let base = cli.server.trim_end_matches('/').to_string();
    let credential = match (&cli.user, &cli.token) {
        (_, Some(token)) => ("authorization", format!("Bearer {token}")),
        (Some(user), None) => {
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password)?;
            let body = serde_json::json!({"name": user, "password": password.trim_end_matches(['\r', '\n'])});
            let mut resp = agent
                .post(&format!("{base}/api/v1/session"))
                .header("content-type", "application/json")
                .send(body.to_string())
                .with_context(|| format!("cannot reach {base}; is the server running?"))?;
            if resp.status() != 200 {
                let body = read_json(&mut resp);
                bail!(
                    "sign-in failed: {}",
                    body["error"]["message"].as_str().unwrap_or("(no message)")
                );
            }
            let cookie = resp
                .headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
                .and_then(|c| c.split(';').next())
                .context("the server set no session cookie")?
                .to_string();
            ("cookie", cookie)
        }
        (None, None) => bail!("give --user NAME (password on stdin) or --token DEVICE_TOKEN"),
    };
    let api = Api {
        base,
        agent,
        credential,
    };

    let coverage = api.get(&format!("/coverage?days={}", cli.days))?;
    println!(
        "Coverage (visited = a visit received in the last {} days)",
        cli.days
    );
    println!(
        "{:<20} {:>10} {:>8} {:>13} {:>12} {:>8} {:>11}",
        "village",
        "households",
        "visited",
        "never visited",
        "open matters",
        "overdue",
        "quarantined"
    );
    for v in coverage["villages"].as_array().into_iter().flatten() {
        let households = v["households"].as_i64().unwrap_or(0);
        let visited = v["visited_recently"].as_i64().unwrap_or(0);
        let share = if households > 0 {
            format!("{visited} ({}%)", visited * 100 / households)
        } else {
            "-".to_string()
        };
        println!(
            "{:<20} {:>10} {:>8} {:>13} {:>12} {:>8} {:>11}",
            v["village"].as_str().unwrap_or("?"),
            households,
            share,
            v["never_visited"],
            v["open_matters_total"],
            v["follow_ups_overdue"],
            v["quarantined"],
        );
    }

    println!();
    println!("Open matters");
    let mut cursor = String::new();
    let mut any = false;
    loop {
        let page = api.get(&format!("/households?matter_status=open&limit=100{cursor}"))?;
        for h in page["households"].as_array().into_iter().flatten() {
            let id = h["id"].as_str().unwrap_or_default();
            let detail = api.get(&format!("/households/{id}"))?;
            println!(
                "- {} ({}) {}",
                h["address_label"].as_str().unwrap_or("?"),
                h["village"].as_str().unwrap_or("?"),
                h["url"].as_str().unwrap_or("")
            );
            for m in detail["matters"].as_array().into_iter().flatten() {
                let value = &m["value"];
                let status = value["status"].as_str().unwrap_or("?");
                if matches!(status, "resolved" | "closed") {
                    continue;
                }
                any = true;
                let description = if value["confidential"] == Value::Bool(true) {
                    "(confidential)".to_string()
                } else {
                    value["description"].as_str().unwrap_or("").to_string()
                };
                println!(
                    "    {} [{}, risk {}] by {}: {}",
                    value["kind"].as_str().unwrap_or("?"),
                    status,
                    value["risk"].as_str().unwrap_or("-"),
                    m["created_by"]["user"].as_str().unwrap_or("?"),
                    description
                );
            }
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    if !any {
        println!("(none)");
    }
    Ok(())
}
