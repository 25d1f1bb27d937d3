//! The event loop's share of private data: one [`Keyring`] per core (this node's device key,
//! the wallet key if the owner unlocked the core here, the data keys it unwrapped), private
//! writes and reads, and sharing held keys with new devices after every applied change.
//!
//! A wallet unlock is remembered in the store (column `meta`, key
//! `private-unlock/<core>`): the derived secret, as sensitive as the node key file next to it.

use std::collections::HashMap;

use crate::core::private::object::ObjectKey;
use crate::core::private::{self, KeyId, Keyring, PrivateError, UNLOCK_STORE_PREFIX};
use crate::core::Address;
use crate::node::client::{CoreCommandError, CoreSummary, UnlockOutcome};
use crate::store::Column;

use super::EventLoop;

/// Keyrings of the cores this node reads or writes privately, made on first use.
#[derive(Default)]
pub(super) struct PrivateState {
    keyrings: HashMap<Address, Keyring>,
}

fn unlock_key(core: &Address) -> Vec<u8> {
    format!("{UNLOCK_STORE_PREFIX}{core}").into_bytes()
}

/// The command error of a failed private read or write.
pub(super) fn private_error(core: &Address, e: PrivateError) -> CoreCommandError {
    match e {
        PrivateError::Encrypted { .. } => CoreCommandError::Encrypted(core.to_checksum()),
        PrivateError::Undecryptable { path } => CoreCommandError::Undecryptable(path),
        PrivateError::Write(w) => super::cores::write_error(core, w),
        PrivateError::Path(_) | PrivateError::NotPrivate(_) | PrivateError::ReservedKey | PrivateError::BadUnlock(_) => {
            CoreCommandError::InvalidInput(e.to_string())
        }
        other => CoreCommandError::Refused(other.to_string()),
    }
}

impl EventLoop {
    /// The keyring of `core`, restoring a remembered unlock the first time.
    fn keyring(&mut self, core: Address) -> &mut Keyring {
        let device = self.msg.device.clone();
        let store = &self.store;
        self.private.keyrings.entry(core).or_insert_with(|| {
            let mut keyring = Keyring::new(core, device);
            match store.get(Column::Meta, &unlock_key(&core)) {
                Ok(Some(secret)) => match <[u8; 32]>::try_from(secret.as_slice()) {
                    Ok(secret) => keyring.unlock_with_secret(secret),
                    Err(_) => tracing::warn!(%core, "corrupt remembered unlock ignored"),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(%core, "cannot read the remembered unlock: {e}"),
            }
            keyring
        })
    }

    /// `core private`: declares a namespace private.
    pub(super) fn core_private(&mut self, core: Address, namespace: &str) -> Result<CoreSummary, CoreCommandError> {
        let keypair = self.cores.keypair.clone();
        let replica = super::cores::held(&mut self.cores.replicas, &core)?;
        let delegation = replica.own_delegation().cloned().ok_or_else(|| CoreCommandError::NotWritable(core.to_checksum()))?;
        match private::declare(replica, namespace, &keypair, &delegation) {
            Ok(envelope) => {
                let heads = replica.heads();
                self.announce_local(core, &heads);
                self.publish(core, envelope);
            }
            Err(PrivateError::Write(crate::core::WriteError::NoChange)) => {}
            Err(e) => return Err(private_error(&core, e)),
        }
        self.core_summary(core)
    }

    /// A write to a private namespace: encrypted, maybe after a new data key.
    pub(super) fn core_set_private(&mut self, core: Address, namespace: &str, path: &str, value: &serde_json::Value) -> Result<(), CoreCommandError> {
        let keypair = self.cores.keypair.clone();
        self.keyring(core);
        let keyring = self.private.keyrings.get_mut(&core).ok_or_else(|| CoreCommandError::NotHeld(core.to_checksum()))?;
        let replica = super::cores::held(&mut self.cores.replicas, &core)?;
        let delegation = replica.own_delegation_for(namespace).cloned().ok_or_else(|| CoreCommandError::NotWritable(core.to_checksum()))?;
        let changes = private::set(replica, keyring, namespace, path, value, &keypair, &delegation).map_err(|e| private_error(&core, e))?;
        if !changes.is_empty() {
            let heads = replica.heads();
            self.announce_local(core, &heads);
        }
        for envelope in changes {
            self.publish(core, envelope);
        }
        Ok(())
    }

    /// The data key a new private object is encrypted with, maybe after making a new one.
    pub(super) fn core_object_key(&mut self, core: Address) -> Result<ObjectKey, CoreCommandError> {
        let keypair = self.cores.keypair.clone();
        self.keyring(core);
        let keyring = self.private.keyrings.get_mut(&core).ok_or_else(|| CoreCommandError::NotHeld(core.to_checksum()))?;
        let replica = super::cores::held(&mut self.cores.replicas, &core)?;
        let delegation = replica.own_delegation().cloned().ok_or_else(|| CoreCommandError::NotWritable(core.to_checksum()))?;
        let (key, changes) = private::object_key(replica, keyring, &keypair, &delegation).map_err(|e| private_error(&core, e))?;
        if !changes.is_empty() {
            let heads = replica.heads();
            self.announce_local(core, &heads);
        }
        for envelope in changes {
            self.publish(core, envelope);
        }
        Ok(key)
    }

    /// The data key `id` of `core`, to decrypt a private object.
    pub(super) fn core_object_key_by_id(&mut self, core: Address, id: &KeyId) -> Result<ObjectKey, CoreCommandError> {
        self.keyring(core);
        let keyring = self.private.keyrings.get_mut(&core).ok_or_else(|| CoreCommandError::NotHeld(core.to_checksum()))?;
        let replica = super::cores::held(&mut self.cores.replicas, &core)?;
        keyring.object_key(replica, id).map_err(|e| private_error(&core, e))
    }

    /// A read that decrypts private values (a plain read elsewhere).
    pub(super) fn core_get_private(&mut self, core: Address, namespace: &str, path: &str) -> Result<Option<serde_json::Value>, CoreCommandError> {
        self.keyring(core);
        let keyring = self.private.keyrings.get_mut(&core).ok_or_else(|| CoreCommandError::NotHeld(core.to_checksum()))?;
        let replica = self.cores.replicas.get_mut(&core).ok_or_else(|| CoreCommandError::NotHeld(core.to_checksum()))?;
        private::get(replica, keyring, namespace, path).map_err(|e| private_error(&core, e))
    }

    /// `core unlock`: checks the owner's signature, remembers the derived secret, then shares.
    pub(super) fn core_unlock(&mut self, core: Address, signature: &[u8]) -> Result<UnlockOutcome, CoreCommandError> {
        super::cores::held(&mut self.cores.replicas, &core)?;
        let secret = self.keyring(core).unlock(signature).map_err(|e| private_error(&core, e))?;
        self.store.put_sync(Column::Meta, &unlock_key(&core), &secret).map_err(|e| CoreCommandError::Storage(e.to_string()))?;
        self.private_share(core);
        self.keyring(core);
        let (Some(keyring), Some(replica)) = (self.private.keyrings.get_mut(&core), self.cores.replicas.get_mut(&core)) else {
            return Err(CoreCommandError::NotHeld(core.to_checksum()));
        };
        keyring.refresh(replica);
        let keys = keyring.len();
        tracing::info!(%core, keys, "unlocked the core's private data with the owner's signature");
        Ok(UnlockOutcome { core: core.to_checksum(), keys })
    }

    /// Wraps the data keys this node holds to new devices (and publishes its wallet key), if
    /// it writes the core and holds anything to share.
    pub(super) fn private_share(&mut self, core: Address) {
        if self.cores.replicas.get_mut(&core).is_none_or(|r| r.own_delegation().is_none()) {
            return;
        }
        self.keyring(core);
        let (Some(keyring), Some(replica)) = (self.private.keyrings.get_mut(&core), self.cores.replicas.get_mut(&core)) else { return };
        match private::share(replica, keyring, &self.cores.keypair) {
            Ok(Some(envelope)) => {
                tracing::info!(%core, "shared the private data keys with the core's current devices");
                let heads = replica.heads();
                self.announce_local(core, &heads);
                self.publish(core, envelope);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(%core, "cannot share the private data keys: {e}"),
        }
    }
}
