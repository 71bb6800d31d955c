//! `outpost user add|ls|rm|token|revoke` and `outpost audit`: operator accounts and the audit
//! log (docs/accounts.md).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use outpost_api::accounts::{AuditEntry, RevokeResponse, UserInfo, UserRequest, UserTokenRequest, UserTokenResponse};
use outpost_api::DeleteResponse;

use crate::client::Client;
use crate::output::{age, table};
use crate::Format;

#[derive(Subcommand)]
pub enum UserCmd {
    /// Add an account; prints its first token (shown once).
    Add {
        name: String,
        /// admin (everything), operator (apply, delete, rollouts, exec, logs, reads), viewer
        /// (reads), metrics (/metrics only).
        #[arg(long)]
        role: String,
        /// Limit the account to nodes with these labels: k=v[,k=v...] (a key given twice
        /// allows either value).
        #[arg(long)]
        selector: Option<String>,
        /// The token expires after this long (e.g. 30d, 12h); default never.
        #[arg(long)]
        expires: Option<String>,
        /// Read a password for browser login from standard input (first line).
        #[arg(long)]
        password_stdin: bool,
    },
    /// List accounts with their tokens (never the secrets).
    Ls {
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Remove an account, its tokens and its browser sessions.
    Rm { name: String },
    /// A new token for an account (shown once); the old ones keep working until revoked.
    Token {
        name: String,
        /// The token expires after this long (e.g. 30d); default never.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Revoke one token of an account (--token ID, as `outpost user ls` shows), or all of them.
    Revoke {
        name: String,
        #[arg(long)]
        token: Option<String>,
    },
}

/// `--expires` text as seconds.
fn expires_secs(text: Option<&str>) -> Result<Option<u64>> {
    text.map(|t| {
        outpost_api::parse_duration_secs(t)
            .map_err(|e| anyhow::anyhow!("--expires {t:?}: {e}; write it like 30d, 12h or 90m"))
    })
    .transpose()
}

/// Path segment for a user name (the hub checks the name itself).
fn seg(name: &str) -> Result<&str> {
    if let Err(why) = outpost_api::accounts::check_user_name(name) {
        bail!("NAME {name:?} {why}");
    }
    Ok(name)
}

fn print_token(t: &UserTokenResponse, what: &str) {
    println!("{}", t.token);
    let exp = t
        .expires_at
        .map(|e| {
            format!(
                ", expires in {}",
                outpost_api::human_duration(e - outpost_api::now_ms())
            )
        })
        .unwrap_or_default();
    eprintln!(
        "{what} for user {} (token id {}{exp}); shown once: pass it as --token or OUTPOST_TOKEN",
        t.user, t.id
    );
}

pub async fn run(c: &Client, cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Add {
            name,
            role,
            selector,
            expires,
            password_stdin,
        } => {
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the password from standard input")?;
                let p = line.trim_end_matches(['\r', '\n']).to_string();
                if p.is_empty() {
                    bail!("--password-stdin: standard input held no password");
                }
                Some(p)
            } else {
                None
            };
            let req = UserRequest {
                name: seg(&name)?.to_string(),
                role,
                selector,
                expires_secs: expires_secs(expires.as_deref())?,
                password,
            };
            let t: UserTokenResponse = c.post("/v1/users", &req).await?;
            print_token(&t, "account added");
        }
        UserCmd::Ls { output } => {
            let users: Vec<UserInfo> = c.get("/v1/users").await?;
            if output != Format::Table {
                return crate::output::print_value(&users, output);
            }
            if users.is_empty() {
                println!("no accounts; add one with `outpost user add NAME --role viewer`");
                return Ok(());
            }
            let now = outpost_api::now_ms();
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    let live: Vec<String> = u
                        .tokens
                        .iter()
                        .filter(|t| t.revoked_at.is_none() && t.expires_at.is_none_or(|e| e > now))
                        .map(|t| t.id.clone())
                        .collect();
                    let last = u.tokens.iter().filter_map(|t| t.last_used_at).max();
                    vec![
                        u.name.clone(),
                        u.role.clone(),
                        if u.selector.is_empty() {
                            "(all)".into()
                        } else {
                            u.selector.clone()
                        },
                        if u.has_password { "yes".into() } else { "no".into() },
                        if live.is_empty() { "-".into() } else { live.join(",") },
                        age(last),
                        age(Some(u.created_at)),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["NAME", "ROLE", "SELECTOR", "PASSWORD", "TOKENS", "LAST USED", "AGE"],
                    &rows
                )
            );
        }
        UserCmd::Rm { name } => {
            let r: DeleteResponse = c.delete_json(&format!("/v1/users/{}", seg(&name)?)).await?;
            println!("removed {}", r.deleted.join(", "));
        }
        UserCmd::Token { name, expires } => {
            let req = UserTokenRequest {
                expires_secs: expires_secs(expires.as_deref())?,
            };
            let t: UserTokenResponse = c.post(&format!("/v1/users/{}/tokens", seg(&name)?), &req).await?;
            print_token(&t, "new token");
        }
        UserCmd::Revoke { name, token } => {
            let path = match &token {
                Some(id) => format!("/v1/users/{}/tokens/{id}", seg(&name)?),
                None => format!("/v1/users/{}/tokens", seg(&name)?),
            };
            let r: RevokeResponse = c.delete_json(&path).await?;
            if r.revoked.is_empty() {
                println!("user {} had no token to revoke", r.user);
            } else {
                println!("revoked token(s) {} of user {}", r.revoked.join(", "), r.user);
            }
        }
    }
    Ok(())
}

/// `outpost audit [--since 1h] [--user NAME]`.
pub async fn audit(c: &Client, since: Option<&str>, user: Option<&str>, limit: u32, output: Format) -> Result<()> {
    let mut q: Vec<(&str, String)> = vec![("limit", limit.to_string())];
    if let Some(s) = since {
        let secs = outpost_api::parse_duration_secs(s)
            .map_err(|e| anyhow::anyhow!("--since {s:?}: {e}; write it like 1h, 30m or 7d"))?;
        q.push(("since_secs", secs.to_string()));
    }
    if let Some(u) = user {
        q.push(("user", u.to_string()));
    }
    let entries: Vec<AuditEntry> = c.get_query("/v1/audit", &q).await?;
    if output != Format::Table {
        return crate::output::print_value(&entries, output);
    }
    if entries.is_empty() {
        println!("no audited actions in that time");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                age(Some(e.at)),
                e.user.clone(),
                e.action.clone(),
                e.target.clone(),
                e.detail.clone(),
                e.peer.clone(),
                e.result.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["AGE", "USER", "ACTION", "TARGET", "DETAIL", "FROM", "RESULT"], &rows)
    );
    Ok(())
}
