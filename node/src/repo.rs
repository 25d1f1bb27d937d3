//! The node repo: a directory holding the node key, `config.toml`, the RocksDB database and,
//! while a node runs, the API address and secret.
//!
//! ```text
//! ~/.kubelt/
//!   config.toml   settings (see config.rs)
//!   node.key      ed25519 node key, protobuf-encoded, mode 0600
//!   datastore/    RocksDB: small blocks, large blocks' locations, pins, cores, peers, meta
//!     packs/      large blocks' bytes, appended to 64 MiB files (store::packs)
//!   api           URL of the running node's API (removed on clean shutdown)
//!   gateway       URL of the running node's gateway (removed on clean shutdown)
//!   app           URL of the running node's app API (removed on clean shutdown)
//!   app-revoked.json  app tokens revoked with kb_logout (kept until they would expire)
//!   api.cookie    secret every admin API call must carry, mode 0600, new on every start
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use libp2p::identity::Keypair;

use crate::config::Config;
use kubelt_protocol::store::Store;

/// Where a repo lives and what is in it.
#[derive(Debug, Clone)]
pub struct Repo {
    root: PathBuf,
}

impl Repo {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Repo { root: root.into() }
    }

    /// `$KUBELT_REPO` is read by clap; this is the fallback `~/.kubelt`.
    pub fn default_path() -> PathBuf {
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".kubelt")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn key_path(&self) -> PathBuf {
        self.root.join("node.key")
    }
    pub fn datastore_path(&self) -> PathBuf {
        self.root.join("datastore")
    }
    pub fn api_file(&self) -> PathBuf {
        self.root.join("api")
    }
    pub fn gateway_file(&self) -> PathBuf {
        self.root.join("gateway")
    }
    /// URL of the running node's app API (removed on clean shutdown).
    pub fn app_file(&self) -> PathBuf {
        self.root.join("app")
    }
    /// Tokens of the app API revoked with `kb_logout`.
    pub fn app_revoked_path(&self) -> PathBuf {
        self.root.join("app-revoked.json")
    }
    pub fn cookie_path(&self) -> PathBuf {
        self.root.join("api.cookie")
    }

    /// Whether `init` has been run here.
    pub fn is_initialized(&self) -> bool {
        self.config_path().exists() || self.key_path().exists()
    }

    /// Creates the repo: key, commented config, database (opened once to check it).
    /// An existing repo is refused unless `force`, which writes a new key and config and keeps
    /// the data.
    pub fn init(&self, force: bool) -> anyhow::Result<libp2p::PeerId> {
        if self.is_initialized() && !force {
            bail!(
                "a repo already exists at {} (use --force to write a new key and config; the data is kept)",
                self.root.display()
            );
        }
        fs::create_dir_all(&self.root).with_context(|| format!("cannot create {}", self.root.display()))?;
        // Open the database first: if a node is running on this repo, this fails and nothing
        // has been changed yet.
        let store = self.open_store()?;
        store.flush()?;
        drop(store);
        let keypair = Keypair::generate_ed25519();
        let encoded = keypair.to_protobuf_encoding().context("cannot encode the node key")?;
        write_private(&self.key_path(), &encoded)?;
        write_atomic(&self.config_path(), Config::commented_template().as_bytes())?;
        Ok(keypair.public().to_peer_id())
    }

    /// Reads the node key.
    pub fn load_key(&self) -> anyhow::Result<Keypair> {
        let path = self.key_path();
        let bytes = fs::read(&path).with_context(|| format!("cannot read the node key {}", path.display()))?;
        let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!("{} is readable by others (mode {mode:o}); it should be 0600", path.display());
        }
        Keypair::from_protobuf_encoding(&bytes).with_context(|| format!("{} is not a valid node key", path.display()))
    }

    /// Reads `config.toml`.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        Config::load(&self.config_path())
    }

    /// Opens the database; fails clearly when another node holds it.
    pub fn open_store(&self) -> anyhow::Result<Store> {
        let path = self.datastore_path();
        Store::open(&path).map_err(|e| match e {
            kubelt_protocol::store::StoreError::Locked(_) => anyhow::anyhow!(
                "the repo {} is already in use by a running kubelt node (stop it first, or pick another repo with --repo)",
                self.root.display()
            ),
            other => anyhow::Error::new(other).context(format!("cannot open the database in {}", path.display())),
        })
    }

    /// Writes a fresh API secret and returns it.
    pub fn write_cookie(&self) -> anyhow::Result<String> {
        let secret = hex::encode(rand::random::<[u8; 32]>());
        write_private(&self.cookie_path(), secret.as_bytes())?;
        Ok(secret)
    }

    pub fn read_cookie(&self) -> anyhow::Result<String> {
        let text = fs::read_to_string(self.cookie_path())?;
        Ok(text.trim().to_string())
    }

    pub fn write_api_url(&self, url: &str) -> anyhow::Result<()> {
        write_atomic(&self.api_file(), url.as_bytes())
    }

    pub fn read_api_url(&self) -> Option<String> {
        fs::read_to_string(self.api_file()).ok().map(|s| s.trim().to_string())
    }

    pub fn remove_api_url(&self) {
        let _ = fs::remove_file(self.api_file());
    }

    pub fn write_gateway_url(&self, url: &str) -> anyhow::Result<()> {
        write_atomic(&self.gateway_file(), url.as_bytes())
    }

    pub fn read_gateway_url(&self) -> Option<String> {
        fs::read_to_string(self.gateway_file()).ok().map(|s| s.trim().to_string())
    }

    pub fn remove_gateway_url(&self) {
        let _ = fs::remove_file(self.gateway_file());
    }

    pub fn write_app_url(&self, url: &str) -> anyhow::Result<()> {
        write_atomic(&self.app_file(), url.as_bytes())
    }

    pub fn remove_app_url(&self) {
        let _ = fs::remove_file(self.app_file());
    }
}

/// Writes a file that only the owner may read (mode 0600 from its creation on).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Writes a file through a temporary so a crash never leaves half of it.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_private_key_and_refuses_a_second_init() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let repo = Repo::new(dir.path().join("repo"));
        let peer = repo.init(false)?;
        assert_eq!(repo.load_key()?.public().to_peer_id(), peer);
        assert_eq!(fs::metadata(repo.key_path())?.permissions().mode() & 0o777, 0o600);
        assert_eq!(repo.load_config()?, Config::default());
        let err = repo.init(false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(repo.load_key()?.public().to_peer_id(), peer, "a refused init changes nothing");
        assert_ne!(repo.init(true)?, peer);
        Ok(())
    }
}
