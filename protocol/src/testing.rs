//! Helpers shared by the tests of this crate and of the `kubelt` binary. Not part of the API.

/// Deterministic pseudo-random bytes (xorshift64*), so a failing test reproduces. Every seed
/// gives different bytes (the seed is spread before the low bit is forced on).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A directory DAG that a hostile peer could serve and the importer never makes: an entry
/// `evil` that is a symlink to `target`, then a second entry `evil` that is a directory
/// holding the file `pwned` (content `pwned\n`). An exporter that writes the symlink and then
/// creates the directory through it writes `<target>/pwned`, outside its output.
pub fn symlink_and_directory_of_one_name(
    target: &[u8],
) -> Result<(cid::Cid, Vec<crate::store::Block>), crate::unixfs::UnixfsError> {
    use crate::unixfs::dag_pb::{encode_node, LinkRef, DAG_PB, DIRECTORY_DATA};
    use crate::unixfs::dir::symlink_block;
    use crate::unixfs::{add_bytes, DirectoryBuilder, ImportOptions};

    let opts = ImportOptions::default();
    let (file, mut blocks) = add_bytes(b"pwned\n", &opts)?;
    let mut inner = DirectoryBuilder::new(opts.clone());
    inner.add("pwned", file)?;
    let inner = inner.finish(&mut blocks)?;
    let symlink = symlink_block(&opts, target);
    let links = [
        LinkRef { cid: &symlink.cid, name: "evil", tsize: symlink.data.len() as u64 },
        LinkRef { cid: &inner.cid, name: "evil", tsize: inner.tsize },
    ];
    let root = opts.block(DAG_PB, bytes::Bytes::from(encode_node(links.into_iter(), Some(DIRECTORY_DATA))));
    let root_cid = root.cid;
    blocks.push(symlink);
    blocks.push(root);
    Ok((root_cid, blocks))
}

/// A CAR v1 file holding `blocks` under `root`, so that tests can feed hand-made DAGs to a
/// node with `kubelt dag import`.
pub fn car_of(root: cid::Cid, blocks: &[crate::store::Block]) -> Result<Vec<u8>, crate::car::CarError> {
    use crate::store::{BlockStore, StoreError};

    struct InMemory(std::collections::HashMap<cid::Cid, bytes::Bytes>);
    impl BlockStore for InMemory {
        fn get_block(&self, cid: &cid::Cid) -> Result<Option<bytes::Bytes>, StoreError> {
            Ok(self.0.get(cid).cloned())
        }
        fn has_block(&self, cid: &cid::Cid) -> Result<bool, StoreError> {
            Ok(self.0.contains_key(cid))
        }
    }

    let store = InMemory(blocks.iter().map(|b| (b.cid, b.data.clone())).collect());
    let mut car = Vec::new();
    crate::car::export_car(&store, root, &mut car)?;
    Ok(car)
}
