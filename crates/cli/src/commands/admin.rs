//! Operator commands that work on the database directly: `migrate`, `servers`, `keys`.
//! They need no running service, so an operator can bootstrap before the first start.

use std::io::IsTerminal;

use anyhow::{Context, bail};
use mcp_metrics_core::model::ServerFields;
use mcp_metrics_core::names::is_valid_server_id;
use mcp_metrics_core::secrets::MasterKey;
use mcp_metrics_core::time::{format_rfc3339_ms, now_ms};
use mcp_metrics_server::config::Overrides;
use mcp_metrics_server::http::admin::validate_fields;
use mcp_metrics_server::keyring;
use mcp_metrics_store::{Store, StoreError};
use std::sync::Arc;

use crate::cli::{DatabaseArgs, KeysCommand, ServerAddArgs, ServersCommand};

async fn open(db: &DatabaseArgs) -> anyhow::Result<(mcp_metrics_server::config::Config, Arc<dyn Store>)> {
    let config = super::load_config(db, Overrides::default())?;
    crate::logging::init(config.log_format, "warn");
    let store = mcp_metrics_server::open_store(&config).await?;
    Ok((config, store))
}

pub async fn migrate(db: DatabaseArgs) -> anyhow::Result<()> {
    let (config, store) = open(&db).await?;
    let version = store.schema_version().await?;
    println!(
        "{} is at schema version {version} ({})",
        config.database,
        store.backend()
    );
    Ok(())
}

pub async fn servers(cmd: ServersCommand) -> anyhow::Result<()> {
    match cmd {
        ServersCommand::Add(args) => add_server(args).await,
        ServersCommand::List { db, json } => {
            let (_, store) = open(&db).await?;
            let servers = store.list_servers().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&servers)?);
            } else if servers.is_empty() {
                println!("No servers yet. Add one with `mcp-metrics servers add ID --name NAME`.");
            } else {
                println!("{:<28} {:<28} CREATED", "ID", "NAME");
                for s in servers {
                    println!(
                        "{:<28} {:<28} {}",
                        s.id,
                        s.name.as_deref().unwrap_or("-"),
                        format_rfc3339_ms(s.created_at)
                    );
                }
            }
            Ok(())
        }
        ServersCommand::Remove { id, db } => {
            let (_, store) = open(&db).await?;
            match store.delete_server(&id).await {
                Ok(()) => {
                    println!("Removed server {id} with its credentials, samples and events.");
                    Ok(())
                }
                Err(StoreError::NotFound) => bail!("no server with id {id}"),
                Err(e) => Err(e.into()),
            }
        }
    }
}

async fn add_server(args: ServerAddArgs) -> anyhow::Result<()> {
    if !is_valid_server_id(&args.id) {
        bail!("server ids match [a-z0-9][a-z0-9._-]{{0,63}}; {:?} does not", args.id);
    }
    let fields = ServerFields {
        registry_name: args.registry_name,
        name: args.name,
        description: args.description,
        repository_url: args.repository_url,
        remote_url: args.remote_url,
        owner: args.owner,
    };
    validate_fields(&fields).map_err(anyhow::Error::msg)?;
    let (_, store) = open(&args.db).await?;
    match store.create_server(&args.id, &fields, now_ms()).await {
        Ok(s) => {
            println!(
                "Registered server {}. Issue its first credential with `mcp-metrics keys issue --server {}`.",
                s.id, s.id
            );
            Ok(())
        }
        Err(StoreError::Conflict) => bail!("a server with id {} already exists", args.id),
        Err(e) => Err(e.into()),
    }
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Issue { server, json, db } => {
            let (config, store) = open(&db).await?;
            if store.get_server(&server).await?.is_none() {
                bail!("no server with id {server}; register it with `mcp-metrics servers add {server}`");
            }
            let master =
                keyring::load_master_key(config.master_key.as_deref(), &config.database, store.as_ref()).await?;
            let issued = keyring::issue_credential(store.as_ref(), &master, &server).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&issued)?);
            } else {
                println!("Issued credential {} for server {}.", issued.key_id, issued.server_id);
                println!();
                println!("  api_key:        {}", issued.api_key);
                println!("  signing_secret: {}", issued.signing_secret);
                println!();
                println!("These secrets are shown once and cannot be recovered. Store them now.");
            }
            Ok(())
        }
        KeysCommand::List { server, db } => {
            let (_, store) = open(&db).await?;
            let keys = store.list_credentials(server.as_deref()).await?;
            if keys.is_empty() {
                println!("No credentials.");
                return Ok(());
            }
            println!(
                "{:<22} {:<24} {:<26} {:<26} REVOKED",
                "KEY_ID", "SERVER", "CREATED", "LAST USED"
            );
            for k in keys {
                println!(
                    "{:<22} {:<24} {:<26} {:<26} {}",
                    k.key_id,
                    k.server_id,
                    format_rfc3339_ms(k.created_at),
                    k.last_used_at.map(format_rfc3339_ms).unwrap_or_else(|| "never".into()),
                    k.revoked_at.map(format_rfc3339_ms).unwrap_or_else(|| "-".into()),
                );
            }
            Ok(())
        }
        KeysCommand::Revoke { server, key_id, db } => {
            let (_, store) = open(&db).await?;
            match keyring::revoke_credential(store.as_ref(), &server, &key_id).await {
                Ok(()) => {
                    println!("Revoked {key_id}; requests signed with it are refused from now on.");
                    Ok(())
                }
                Err(StoreError::NotFound) => bail!("server {server} has no credential {key_id}"),
                Err(e) => Err(e.into()),
            }
        }
        KeysCommand::RotateMaster { new_key, db } => {
            let (config, store) = open(&db).await?;
            let old = keyring::load_master_key(config.master_key.as_deref(), &config.database, store.as_ref()).await?;
            let new = match new_key {
                Some(hex) => MasterKey::from_hex(&hex).context("--new-key is not valid")?,
                None => MasterKey::generate(),
            };
            let uses_key_file = config.master_key.is_none() && store.backend() == "sqlite";
            if !uses_key_file {
                // Shown before anything changes, so the key cannot be lost to a crash.
                if std::io::stdout().is_terminal() {
                    println!("The new master key (set MCP_METRICS_MASTER_KEY to it on every node, then restart):");
                }
                println!("{}", new.to_hex());
            }
            let count = keyring::rotate_master_key(store.as_ref(), &config.database, uses_key_file, &old, &new).await?;
            println!("Re-sealed {count} signing secrets under the new master key.");
            if let (true, Some(path)) = (uses_key_file, keyring::key_file_for(&config.database)) {
                println!("The new key is in {}. Restart the service to use it.", path.display());
            }
            Ok(())
        }
    }
}
