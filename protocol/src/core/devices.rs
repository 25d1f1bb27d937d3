//! Device keys in a core: each node that may write the core publishes its X25519 messaging
//! key in its own device namespace `_device:<peer id>`, at `x25519` (hex), signed like any other
//! change (see [`super::delegation::may_write`]: a key writes only its own device namespace).
//!
//! Which device keys are *current* is derived, not written: a device key counts while its
//! node has a known delegation that is valid now and no known revocation. So a revocation
//! removes the key from every replica's list the moment the replica learns the revocation —
//! the revoked node cannot be trusted to delete its own entry, and nobody else may.

use kubelt_proto::core::SignedChange;
use libp2p::identity::{Keypair, PeerId};

use super::delegation::{device_namespace, DEVICE_NAMESPACE_PREFIX};
use super::replica::{unix_now, Replica, WriteError};
use super::value;

/// The path of the key inside a device namespace.
const KEY_PATH: &str = "x25519";

impl Replica {
    /// The device key `peer` published in this core, if any (whether or not still current).
    pub fn published_device_key(&self, peer: &PeerId) -> Option<[u8; 32]> {
        let value = value::get_path(&self.doc, &device_namespace(peer), &[KEY_PATH.to_owned()]).ok()??;
        let bytes = hex::decode(value.as_str()?).ok()?;
        bytes.try_into().ok()
    }

    /// The current device keys of the core at `now` (unix seconds): published by a node that
    /// holds a known delegation valid at `now` and that no known revocation names. Sorted by
    /// peer id.
    pub fn device_keys_at(&self, now: i64) -> Vec<(PeerId, [u8; 32])> {
        let revoked: Vec<PeerId> = self.revocations().into_iter().map(|r| r.peer).collect();
        let mut out: Vec<(PeerId, [u8; 32])> = value::namespaces(&self.doc)
            .iter()
            .filter_map(|ns| ns.strip_prefix(DEVICE_NAMESPACE_PREFIX)?.parse::<PeerId>().ok())
            .filter(|peer| !revoked.contains(peer) && self.delegated_at(peer, now))
            .filter_map(|peer| Some((peer, self.published_device_key(&peer)?)))
            .collect();
        out.sort_by_key(|(peer, _)| peer.to_bytes());
        out
    }

    /// [`Replica::device_keys_at`] now.
    pub fn device_keys(&self) -> Vec<(PeerId, [u8; 32])> {
        self.device_keys_at(unix_now())
    }

    /// Whether a known delegation lets `peer` write this core at `now`.
    fn delegated_at(&self, peer: &PeerId, now: i64) -> bool {
        self.statements
            .values()
            .filter_map(|s| self.delegations.verify(&self.core, s).ok())
            .any(|d| d.peer == *peer && d.valid_at(now).is_ok())
    }

    /// Publishes `key` as this node's device key (`keypair` writes under its own delegation).
    /// Nothing is written when the core already holds that key for this node.
    pub fn publish_device_key(&mut self, key: [u8; 32], keypair: &Keypair) -> Result<Option<SignedChange>, WriteError> {
        let peer = keypair.public().to_peer_id();
        if self.published_device_key(&peer) == Some(key) {
            return Ok(None);
        }
        let delegation = self.own_delegation().cloned().ok_or(WriteError::NoChange)?;
        let namespace = device_namespace(&peer);
        let value = serde_json::Value::String(hex::encode(key));
        let path = [KEY_PATH.to_owned()];
        let envelope = self.local_change(keypair, &delegation, unix_now(), None, &namespace, |tx| value::set_path(tx, &namespace, &path, &value))?;
        Ok(Some(envelope))
    }
}
