//! `kubelt init`.

use crate::repo::Repo;

pub fn init(repo: &Repo, force: bool) -> anyhow::Result<()> {
    let peer_id = repo.init(force)?;
    println!("initialized kubelt repo at {}", repo.root().display());
    println!("peer id: {peer_id}");
    println!("config:  {}", repo.config_path().display());
    Ok(())
}
