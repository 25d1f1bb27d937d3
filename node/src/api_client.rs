//! The CLI's side of the API: finds the running node through `<repo>/api` and
//! `<repo>/api.cookie` and makes JSON-RPC calls; streams content from the gateway whose URL
//! the node wrote to `<repo>/gateway`.

use std::time::Duration;

use anyhow::{anyhow, bail};
use serde_json::{json, Value};

use crate::repo::Repo;

/// A connection to the node running on a repo.
pub struct ApiClient {
    url: String,
    /// The gateway's base URL, if the node wrote one.
    gateway_url: Option<String>,
    secret: String,
    agent: ureq::Agent,
    repo_display: String,
}

impl ApiClient {
    /// Finds the node that runs on `repo`, or says plainly that none does.
    pub fn for_repo(repo: &Repo) -> anyhow::Result<ApiClient> {
        let repo_display = repo.root().display().to_string();
        let not_running = || anyhow!("no kubelt node is running on repo {repo_display} (start one with `kubelt run`)");
        let url = repo.read_api_url().ok_or_else(not_running)?;
        let secret = repo.read_cookie().map_err(|_| not_running())?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(3600))
            .build();
        let gateway_url = repo.read_gateway_url();
        Ok(ApiClient { url, gateway_url, secret, agent, repo_display })
    }

    /// Streams `GET /ipfs/<path>` from the node's gateway; an HTTP error becomes an error with
    /// the gateway's message.
    pub fn gateway_get(&self, path: &str) -> anyhow::Result<Box<dyn std::io::Read + Send + Sync + 'static>> {
        let Some(gateway_url) = &self.gateway_url else {
            bail!("the node running on repo {} did not write its gateway address to <repo>/gateway (restart it with this version of kubelt)", self.repo_display);
        };
        let url = format!("{gateway_url}ipfs/{}", path.trim_start_matches("/ipfs/"));
        match self.agent.get(&url).call() {
            Ok(response) => Ok(response.into_reader()),
            Err(ureq::Error::Status(_, response)) => bail!("{}", response.into_string().unwrap_or_default().trim()),
            Err(e) => Err(e.into()),
        }
    }

    /// Streams `GET /private/<core>/<cid>` from the API: a private object, decrypted by the
    /// node; an HTTP error becomes an error with the node's message.
    pub fn private_get(&self, core: &str, cid: &str) -> anyhow::Result<Box<dyn std::io::Read + Send + Sync + 'static>> {
        let url = format!("{}/private/{core}/{cid}", self.url.trim_end_matches('/'));
        match self.agent.get(&url).set("Authorization", &format!("Bearer {}", self.secret)).call() {
            Ok(response) => Ok(response.into_reader()),
            Err(ureq::Error::Status(_, response)) => bail!("{}", response.into_string().unwrap_or_default().trim()),
            Err(ureq::Error::Transport(t)) if t.kind() == ureq::ErrorKind::ConnectionFailed => {
                bail!("no kubelt node is running on repo {} (start one with `kubelt run`)", self.repo_display)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Calls a method and returns its result, or the node's error message.
    pub fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let request = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
        let response = self
            .agent
            .post(&self.url)
            .set("Authorization", &format!("Bearer {}", self.secret))
            .send_json(request);
        let body: Value = match response {
            Ok(r) => r.into_json()?,
            Err(ureq::Error::Status(_, r)) => r.into_json()?,
            Err(ureq::Error::Transport(t)) if t.kind() == ureq::ErrorKind::ConnectionFailed => {
                bail!("no kubelt node is running on repo {} (start one with `kubelt run`)", self.repo_display)
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(error) = body.get("error") {
            let message = error.get("message").and_then(Value::as_str).unwrap_or("unknown error");
            bail!("{message}");
        }
        body.get("result").cloned().ok_or_else(|| anyhow!("the node sent a reply without a result"))
    }
}
