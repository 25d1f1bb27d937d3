//! `kubelt core ...`: delegate, revoke, submit, follow, set, get, private, unlock, ls, heads. Every command
//! talks to the running node.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};

use super::query::print_json;
use crate::api_client::ApiClient;
use crate::repo::Repo;
use kubelt_protocol::core::DevWallet;

#[derive(Debug, Subcommand)]
pub enum CoreCommand {
    /// Print the SIWE message the owner signs to let a node write to their core.
    Delegate {
        /// The owner's Ethereum address (the core id).
        owner: String,
        /// Peer id to authorize (default: this node).
        #[arg(long)]
        peer: Option<String>,
        /// Namespaces it may write: a,b,c or * for all.
        #[arg(long, default_value = "*")]
        namespaces: String,
        /// How long the delegation is valid: 30d, 12h, 15m...
        #[arg(long, default_value = "30d")]
        expires: String,
    },
    /// Print the message the owner signs to revoke a node key.
    Revoke {
        owner: String,
        #[arg(long)]
        peer: String,
    },
    /// Verify and apply an owner-signed delegation or revocation.
    Submit {
        /// File holding the signed message, exactly as signed.
        #[arg(long, value_name = "FILE")]
        message_file: PathBuf,
        /// The wallet's 0x-hex signature (EIP-191 personal_sign).
        #[arg(long, required_unless_present = "sign_with", conflicts_with = "sign_with")]
        signature: Option<String>,
        /// For local development: sign with this hex secp256k1 key file instead.
        #[arg(long, value_name = "KEYFILE")]
        sign_with: Option<PathBuf>,
    },
    /// Hold a replica of a core without write rights.
    Follow { address: String },
    /// Write a JSON value at NAMESPACE/PATH.
    Set { address: String, namespace: String, path: String, json: String },
    /// Print the JSON at NAMESPACE[/PATH].
    Get { address: String, namespace: String, path: Option<String> },
    /// Declare NAMESPACE private: values written there from now on are encrypted, readable
    /// only on the owner's devices and on nodes the owner's wallet unlocked.
    Private { address: String, namespace: String },
    /// Unlock the core's private data on this node: without a signature, print the message
    /// the owner signs; with one, apply it.
    Unlock {
        address: String,
        /// The wallet's 0x-hex signature of the printed message (EIP-191 personal_sign).
        #[arg(long, conflicts_with = "sign_with")]
        signature: Option<String>,
        /// For local development: sign with this hex secp256k1 key file instead.
        #[arg(long, value_name = "KEYFILE")]
        sign_with: Option<PathBuf>,
    },
    /// List the cores this node holds.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Print a core's heads.
    Heads { address: String },
    /// For local development and testnets: print the address of a hex secp256k1 key file
    /// (with --create, first write a new random key there, mode 0600).
    DevWallet {
        #[arg(value_name = "KEYFILE")]
        key: PathBuf,
        #[arg(long)]
        create: bool,
    },
}

pub fn core(repo: &Repo, command: CoreCommand) -> anyhow::Result<()> {
    if let CoreCommand::DevWallet { key, create } = &command {
        let wallet = if *create { DevWallet::create(key)? } else { DevWallet::from_file(key)? };
        println!("{}", wallet.address().to_checksum());
        return Ok(());
    }
    let api = ApiClient::for_repo(repo)?;
    match command {
        CoreCommand::Delegate { owner, peer, namespaces, expires } => {
            let result = api.call("core_delegationMessage", json!({ "address": owner, "peer": peer, "namespaces": namespaces, "expires": expires }))?;
            print!("{}", result["message"].as_str().unwrap_or_default());
            println!();
        }
        CoreCommand::Revoke { owner, peer } => {
            let result = api.call("core_revocationMessage", json!({ "address": owner, "peer": peer }))?;
            println!("{}", result["message"].as_str().unwrap_or_default());
        }
        CoreCommand::Submit { message_file, signature, sign_with } => {
            let message = std::fs::read_to_string(&message_file).with_context(|| format!("cannot read {}", message_file.display()))?;
            // A trailing newline from an editor or `>` redirection is not part of what was signed.
            let message = message.trim_end_matches('\n');
            let signature = match (signature, sign_with) {
                (Some(signature), _) => signature,
                (None, Some(key)) => format!("0x{}", hex::encode(DevWallet::from_file(&key)?.sign(message)?)),
                (None, None) => anyhow::bail!("give --signature or --sign-with"),
            };
            let outcome = api.call("core_submit", json!({ "message": message, "signature": signature }))?;
            println!(
                "{} applied: core {} peer {}",
                outcome["kind"].as_str().unwrap_or("statement"),
                outcome["core"].as_str().unwrap_or("?"),
                outcome["peer"].as_str().unwrap_or("?")
            );
        }
        CoreCommand::Follow { address } => {
            let summary = api.call("core_follow", json!({ "address": address }))?;
            println!("following core {}", summary["address"].as_str().unwrap_or("?"));
        }
        CoreCommand::Set { address, namespace, path, json } => {
            let value: Value = serde_json::from_str(&json).with_context(|| format!("the value is not valid JSON: {json}"))?;
            let summary = api.call("core_set", json!({ "address": address, "namespace": namespace, "path": path, "value": value }))?;
            println!("heads {}", summary["heads"].as_array().map(|h| h.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")).unwrap_or_default());
        }
        CoreCommand::Get { address, namespace, path } => {
            let value = api.call("core_get", json!({ "address": address, "namespace": namespace, "path": path.unwrap_or_default() }))?;
            print_json(&value)?;
        }
        CoreCommand::Private { address, namespace } => {
            api.call("core_private", json!({ "address": address, "namespace": namespace }))?;
            println!("namespace {namespace} of core {address} is private: values written there from now on are encrypted");
        }
        CoreCommand::Unlock { address, signature, sign_with } => {
            let message = api.call("core_unlockMessage", json!({ "address": address }))?;
            let message = message["message"].as_str().unwrap_or_default().to_owned();
            let signature = match (signature, sign_with) {
                (Some(signature), _) => signature,
                (None, Some(key)) => format!("0x{}", hex::encode(DevWallet::from_file(&key)?.sign(&message)?)),
                (None, None) => {
                    println!("{message}");
                    eprintln!("\nsign this message with the owner's wallet (personal_sign), then run: kubelt core unlock {address} --signature 0x...");
                    return Ok(());
                }
            };
            let outcome = api.call("core_unlock", json!({ "address": address, "signature": signature }))?;
            println!("unlocked core {}: {} data keys held", outcome["core"].as_str().unwrap_or("?"), outcome["keys"]);
        }
        CoreCommand::Ls { json } => {
            let cores = api.call("core_ls", Value::Null)?;
            if json {
                return print_json(&cores);
            }
            let list = cores.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no cores");
            }
            for core in list {
                let heads: Vec<String> = core["heads"].as_array().into_iter().flatten().filter_map(Value::as_str).map(|h| h.chars().take(12).collect()).collect();
                println!(
                    "{} {} changes, {} replicas online ({} in the gossip mesh), {}, heads {}",
                    core["address"].as_str().unwrap_or("?"),
                    core["changes"],
                    core["replicas"],
                    core["mesh"],
                    if core["writable"].as_bool().unwrap_or(false) { "writable" } else { "read-only" },
                    heads.join(" ")
                );
            }
        }
        CoreCommand::DevWallet { .. } => {}
        CoreCommand::Heads { address } => {
            let heads = api.call("core_heads", json!({ "address": address }))?;
            for head in heads.as_array().into_iter().flatten() {
                println!("{}", head.as_str().unwrap_or_default());
            }
        }
    }
    Ok(())
}
