//! Pins in the `pins` column: CID bytes -> pin kind. A recursive pin keeps a whole DAG, a
//! direct pin one block. Garbage collection (in `unixfs::gc`) removes what no pin reaches.

use cid::Cid;

use super::{Column, Store, StoreError};

/// How much of a DAG a pin keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinKind {
    /// The block and everything it links to.
    Recursive,
    /// The block alone.
    Direct,
}

impl PinKind {
    fn to_byte(self) -> u8 {
        match self {
            PinKind::Recursive => 1,
            PinKind::Direct => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(PinKind::Recursive),
            2 => Some(PinKind::Direct),
            _ => None,
        }
    }
}

/// One pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinRecord {
    /// The pinned root.
    pub cid: Cid,
    /// Direct (the block) or recursive (the whole DAG).
    pub kind: PinKind,
}

impl Store {
    /// Pins a CID, synced to disk, after making the blocks written so far durable: their pack
    /// files are synced first, and the pin's own log sync covers every block and location
    /// logged before it. A recursive pin replaces a direct one.
    pub fn pin(&self, cid: &Cid, kind: PinKind) -> Result<(), StoreError> {
        self.sync_blocks()?;
        self.put_sync(Column::Pins, &cid.to_bytes(), &[kind.to_byte()])
    }

    /// Removes a pin; returns whether there was one.
    pub fn unpin(&self, cid: &Cid) -> Result<bool, StoreError> {
        let key = cid.to_bytes();
        if !self.contains(Column::Pins, &key)? {
            return Ok(false);
        }
        self.delete_sync(Column::Pins, &key)?;
        Ok(true)
    }

    /// The pin on a CID, if any.
    pub fn pin_kind(&self, cid: &Cid) -> Result<Option<PinKind>, StoreError> {
        match self.get(Column::Pins, &cid.to_bytes())? {
            None => Ok(None),
            Some(value) => decode_kind(&value).map(Some),
        }
    }

    /// Every pin.
    pub fn pins(&self) -> Result<Vec<PinRecord>, StoreError> {
        self.iter(Column::Pins)
            .map(|r| {
                let (key, value) = r?;
                let cid = Cid::try_from(&key[..]).map_err(|e| StoreError::Corrupt {
                    column: Column::Pins.name(),
                    reason: format!("bad CID key: {e}"),
                })?;
                Ok(PinRecord { cid, kind: decode_kind(&value)? })
            })
            .collect()
    }
}

fn decode_kind(value: &[u8]) -> Result<PinKind, StoreError> {
    value.first().copied().and_then(PinKind::from_byte).ok_or_else(|| StoreError::Corrupt {
        column: Column::Pins.name(),
        reason: format!("bad pin kind {value:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Block;

    #[test]
    fn pins_are_listed_and_removed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let a = Block::new_v1(0x55, bytes::Bytes::from_static(b"a")).cid;
        store.pin(&a, PinKind::Direct)?;
        store.pin(&a, PinKind::Recursive)?;
        assert_eq!(store.pins()?, vec![PinRecord { cid: a, kind: PinKind::Recursive }]);
        assert!(store.unpin(&a)?);
        assert!(!store.unpin(&a)?);
        assert!(store.pins()?.is_empty());
        Ok(())
    }
}
