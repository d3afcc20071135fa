//! Finding the master key and issuing credentials (DESIGN.md §2 Credential, §4.6).
//!
//! Shared by `serve`, the operator API and the `keys` commands, so every path that
//! creates a secret follows the same rules: shown once, stored hashed or sealed, and
//! never logged.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mcp_metrics_core::model::{EventSource, NewEvent, StoredCredential};
use mcp_metrics_core::secrets::{self, MasterKey};
use mcp_metrics_core::time::now_ms;
use mcp_metrics_store::{Store, StoreResult};
use serde::Serialize;

const FINGERPRINT_META_KEY: &str = "master_key_fingerprint";

/// Where the generated master key of a SQLite database lives: beside the database.
pub fn key_file_for(database_url: &str) -> Option<PathBuf> {
    let path = mcp_metrics_store::sqlite::path_from_url(database_url).ok()?;
    let mut name = path.file_name()?.to_os_string();
    name.push(".master-key");
    Some(path.with_file_name(name))
}

fn write_private_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// Resolves the master key: `MCP_METRICS_MASTER_KEY` if set; otherwise, for SQLite, the
/// key file beside the database (created on first use). Then checks it against the
/// fingerprint recorded in the database, recording it on first use.
pub async fn load_master_key(
    configured: Option<&str>,
    database_url: &str,
    store: &dyn Store,
) -> anyhow::Result<MasterKey> {
    let recorded = store.meta_get(FINGERPRINT_META_KEY).await?;
    let key = match configured {
        Some(hex) => MasterKey::from_hex(hex).context("MCP_METRICS_MASTER_KEY is not valid")?,
        None if store.backend() == "sqlite" => {
            let path =
                key_file_for(database_url).context("cannot derive a master key file path from the database URL")?;
            if path.exists() {
                read_key_file(&path)?
            } else if recorded.is_some() {
                // Generating a key now would make every sealed secret unreadable.
                bail!(
                    "the master key file {} is missing, but this database's signing secrets were sealed with a \
                     master key; restore that file or set MCP_METRICS_MASTER_KEY",
                    path.display()
                );
            } else {
                let key = MasterKey::generate();
                write_private_file(&path, &format!("{}\n", key.to_hex()))?;
                tracing::warn!(
                    path = %path.display(),
                    "MCP_METRICS_MASTER_KEY is not set: created a new master key file (mode 0600); back it up with the database"
                );
                key
            }
        }
        None => bail!(
            "MCP_METRICS_MASTER_KEY is required with {}: every node must share it. Make one with `openssl rand -hex 32`",
            store.backend()
        ),
    };
    let fingerprint = key.fingerprint();
    match recorded {
        Some(stored) if stored != fingerprint => bail!(
            "the master key does not match the one this database's signing secrets were sealed with \
             (fingerprint {stored}); set MCP_METRICS_MASTER_KEY to that key, or restore its key file"
        ),
        Some(_) => {}
        None => store.meta_set(FINGERPRINT_META_KEY, &fingerprint).await?,
    }
    Ok(key)
}

fn read_key_file(path: &Path) -> anyhow::Result<MasterKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the master key file {}", path.display()))?;
    MasterKey::from_hex(&text).with_context(|| format!("the master key file {} is corrupt", path.display()))
}

/// Re-seals every signing secret under `new` and records its fingerprint, in one
/// transaction: either every secret opens with the new key or none changed.
///
/// With a SQLite key file, the new key is first written to `<file>.new` and moved over
/// the key file after the commit, so no moment exists where the sealed secrets and every
/// copy of their key disagree. Returns how many secrets were re-sealed.
pub async fn rotate_master_key(
    store: &dyn Store,
    database_url: &str,
    uses_key_file: bool,
    old: &MasterKey,
    new: &MasterKey,
) -> anyhow::Result<usize> {
    let credentials = store.all_sealed_credentials().await?;
    let mut resealed = Vec::with_capacity(credentials.len());
    for c in &credentials {
        let secret = old.open(&c.key_id, &c.sealed_secret).with_context(|| {
            format!(
                "cannot open the signing secret of {} with the current master key",
                c.key_id
            )
        })?;
        resealed.push((c.key_id.clone(), new.seal(&c.key_id, &secret)));
    }
    let staged = if uses_key_file {
        let path = key_file_for(database_url).context("cannot derive the master key file path")?;
        let mut staged_name = path.file_name().unwrap_or_default().to_os_string();
        staged_name.push(".new");
        let staged = path.with_file_name(staged_name);
        let _ = std::fs::remove_file(&staged);
        write_private_file(&staged, &format!("{}\n", new.to_hex()))?;
        Some((staged, path))
    } else {
        None
    };
    store
        .reseal_credentials(&resealed, FINGERPRINT_META_KEY, &new.fingerprint())
        .await?;
    if let Some((staged, path)) = staged {
        std::fs::rename(&staged, &path).with_context(|| {
            format!(
                "the secrets are re-sealed but {} could not replace {}: move it by hand",
                staged.display(),
                path.display()
            )
        })?;
    }
    Ok(resealed.len())
}

/// A new credential as shown, once, to whoever issued it.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedCredential {
    pub key_id: String,
    pub server_id: String,
    pub api_key: String,
    pub signing_secret: String,
}

/// Creates a credential for `server_id`. When the server already has an active key
/// this is a rotation, and a `key_rotated` event goes on the server's timeline.
pub async fn issue_credential(
    store: &dyn Store,
    master_key: &MasterKey,
    server_id: &str,
) -> StoreResult<IssuedCredential> {
    let already_active = store
        .list_credentials(Some(server_id))
        .await?
        .iter()
        .any(|c| c.revoked_at.is_none());
    let key_id = secrets::new_key_id();
    let api_key = secrets::new_api_key();
    let signing_secret = secrets::new_signing_secret();
    let now = now_ms();
    store
        .insert_credential(&StoredCredential {
            key_id: key_id.clone(),
            server_id: server_id.to_owned(),
            api_key_hash: secrets::hash_api_key(&api_key),
            sealed_secret: master_key.seal(&key_id, &signing_secret),
            created_at: now,
            revoked_at: None,
            last_used_at: None,
        })
        .await?;
    if already_active {
        system_event(
            store,
            server_id,
            "key_rotated",
            format!("New credential {key_id} issued"),
        )
        .await;
    }
    Ok(IssuedCredential {
        key_id,
        server_id: server_id.to_owned(),
        api_key,
        signing_secret,
    })
}

/// Revokes a credential and notes it on the server's timeline. Revoking an already
/// revoked credential changes nothing and records nothing.
pub async fn revoke_credential(store: &dyn Store, server_id: &str, key_id: &str) -> StoreResult<()> {
    if store.revoke_credential(server_id, key_id, now_ms()).await? {
        system_event(store, server_id, "key_revoked", format!("Credential {key_id} revoked")).await;
    }
    Ok(())
}

async fn system_event(store: &dyn Store, server_id: &str, kind: &str, title: String) {
    let event = NewEvent {
        server_id: server_id.to_owned(),
        kind: kind.to_owned(),
        title,
        detail: None,
        at: now_ms(),
        source: EventSource::System,
    };
    if let Err(e) = store.insert_event(&event).await {
        tracing::warn!(error = %e, server_id, kind, "could not record a system event");
    }
}
