//! `kubelt msg ...`: send a message from a core this node writes to another core, list a
//! core's inbox, read and delete messages. Every command talks to the running node.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use super::query::print_json;
use crate::api_client::ApiClient;
use crate::repo::Repo;

#[derive(Debug, Subcommand)]
pub enum MsgCommand {
    /// Send an encrypted message from a core this node writes to another core.
    Send {
        /// The sender core (this node must hold a delegation to write it).
        #[arg(long, value_name = "0xSENDER")]
        from: String,
        /// The recipient core.
        #[arg(long, value_name = "0xRECIPIENT")]
        to: String,
        /// The text (or give --file).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Send the contents of a UTF-8 text file.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List a core's inbox on this node: id, sender, time and the text where this node can
    /// decrypt it ([encrypted] elsewhere).
    Inbox {
        #[arg(value_name = "0xRECIPIENT")]
        core: String,
        #[arg(long)]
        json: bool,
    },
    /// Print one message (and mark it read on this node).
    Read {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a message on this node; no other replica brings it back here.
    Delete { id: String },
    /// Messages waiting for a replica of their recipient.
    Outbox {
        #[arg(long)]
        json: bool,
    },
}

pub fn msg(repo: &Repo, command: MsgCommand) -> anyhow::Result<()> {
    let api = ApiClient::for_repo(repo)?;
    match command {
        MsgCommand::Send { from, to, text, file, json } => {
            let text = match (text, file) {
                (Some(text), _) => text,
                (None, Some(path)) => std::fs::read_to_string(&path).with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?,
                (None, None) => anyhow::bail!("give the text or --file"),
            };
            let sent = api.call("msg_send", json!({ "from": from, "to": to, "text": text }))?;
            if json {
                return print_json(&sent);
            }
            let id = sent["id"].as_str().unwrap_or("?");
            if sent["delivered"].as_bool().unwrap_or(false) {
                println!("{id} delivered to a replica of {}", sent["to"].as_str().unwrap_or("?"));
            } else {
                println!("{id} queued: no replica of {} took it yet; the node keeps trying", sent["to"].as_str().unwrap_or("?"));
            }
        }
        MsgCommand::Inbox { core, json } => {
            let messages = api.call("msg_inbox", json!({ "address": core }))?;
            if json {
                return print_json(&messages);
            }
            let list = messages.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no messages");
            }
            for m in &list {
                println!("{}", line(m));
            }
        }
        MsgCommand::Read { id, json } => {
            let message = api.call("msg_read", json!({ "id": id }))?;
            if json {
                return print_json(&message);
            }
            println!("id:   {}", message["id"].as_str().unwrap_or("?"));
            println!("from: {}", message["from"].as_str().unwrap_or("?"));
            println!("to:   {}", message["to"].as_str().unwrap_or("?"));
            println!("sent: {}", time_of(&message["sent_at"]));
            println!();
            println!("{}", message["text"].as_str().unwrap_or("[encrypted]"));
        }
        MsgCommand::Delete { id } => {
            api.call("msg_delete", json!({ "id": id }))?;
            println!("deleted {id}");
        }
        MsgCommand::Outbox { json } => {
            let entries = api.call("msg_outbox", Value::Null)?;
            if json {
                return print_json(&entries);
            }
            let list = entries.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("outbox empty");
            }
            for e in list {
                println!("{} to {}", e["id"].as_str().unwrap_or("?"), e["to"].as_str().unwrap_or("?"));
            }
        }
    }
    Ok(())
}

/// One inbox line: id, sender, time, text.
fn line(m: &Value) -> String {
    let text = m["text"].as_str().map(|t| t.replace('\n', " ")).unwrap_or_else(|| "[encrypted]".into());
    format!("{} {} {} {}", m["id"].as_str().unwrap_or("?"), m["from"].as_str().unwrap_or("?"), time_of(&m["sent_at"]), text)
}

/// Unix milliseconds as RFC 3339.
fn time_of(ms: &Value) -> String {
    ms.as_i64()
        .and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "?".into())
}
