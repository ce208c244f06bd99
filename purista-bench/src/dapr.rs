//! `dapr://double`: the in-repo Dapr sidecar double in this process (cargo feature `dapr`).
//!
//! A Dapr app talks to a sidecar of its own, and Dapr delivers a topic message once per app id,
//! so every bridge instance of a run gets a sidecar of its own with an app id of its own
//! (`<prefix>-<n>`), as the conformance harness deploys them. The raw baseline takes its
//! sidecars from the same double ([`DoubleSidecars::sidecar`]), so both sides of a ratio go
//! through the same sidecar code.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use purista::Connection;
use purista::dapr::double::{DaprDouble, DoubleOptions, Sidecar, SidecarOptions};
use purista::dapr::{DaprBridge, DaprConfig};
use purista::prelude::EventBridge;

use crate::target::Role;

/// The URL that selects the double.
pub const DOUBLE_URL: &str = "dapr://double";

/// Whether `url` asks for the sidecar double.
pub fn is_double(url: &str) -> bool {
    url.trim_end_matches('/').eq_ignore_ascii_case(DOUBLE_URL)
}

/// Refuses a `dapr://` URL naming one real sidecar: a sidecar serves one app, and every
/// scenario runs several bridge instances.
pub fn refuse_single_sidecar(url: &str) -> anyhow::Result<()> {
    if url
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("dapr://"))
    {
        bail!(
            "`{}` names one Dapr sidecar, which serves one app; every scenario runs several \
             bridge instances, each needing a sidecar of its own (run `{DOUBLE_URL}`)",
            purista::redact_url(url)
        );
    }
    Ok(())
}

/// The double and the app ids handed out so far.
pub struct DoubleSidecars {
    double: DaprDouble,
    prefix: String,
    apps: AtomicU64,
}

impl std::fmt::Debug for DoubleSidecars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoubleSidecars")
            .field("prefix", &self.prefix)
            .field("apps", &self.apps.load(Ordering::Relaxed))
            .finish()
    }
}

/// One double is equal only to itself (the raw baseline's enum compares by identity).
impl PartialEq for DoubleSidecars {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for DoubleSidecars {}

impl DoubleSidecars {
    /// Starts the double (its own runtime); app ids are `<prefix>-<n>`.
    pub fn start(prefix: &str) -> anyhow::Result<DoubleSidecars> {
        let double = DaprDouble::start(DoubleOptions::default())
            .context("starting the Dapr sidecar double")?;
        eprintln!("purista-bench: Dapr sidecar double in process, one sidecar per app");
        Ok(DoubleSidecars {
            double,
            prefix: prefix.to_string(),
            apps: AtomicU64::new(0),
        })
    }

    /// A new sidecar for a new app; returns it with the app id. Point it at its app with
    /// [`Sidecar::connect_app`]; one never pointed at an app only serves the sidecar API.
    pub fn sidecar(&self, role: &str) -> anyhow::Result<(Sidecar, String)> {
        let n = self.apps.fetch_add(1, Ordering::Relaxed);
        let app_id = format!("{}-{role}-{n}", self.prefix);
        let sidecar = self
            .double
            .sidecar(SidecarOptions {
                app_id: app_id.clone(),
                ..SidecarOptions::default()
            })
            .with_context(|| format!("starting a sidecar for app `{app_id}`"))?;
        Ok((sidecar, app_id))
    }

    /// One more bridge instance: a sidecar of its own, and the bridge the facade's `dapr://`
    /// driver builds for `dapr://<sidecar>?app_id=<id>`, with its app server on a port it
    /// binds itself (`app_port=0`), the port the sidecar is then pointed at. (A free port
    /// picked beforehand could be taken, or still reached through a pooled connection to the
    /// app that had it, before the bridge binds it.)
    /// A [`Role::Publisher`] app is configured `events=off`.
    pub async fn connect(&self, prefix: &str, role: Role) -> anyhow::Result<(Connection, Sidecar)> {
        let (sidecar, app_id) = self.sidecar("app")?;
        let hostport = sidecar.address().trim_start_matches("http://").to_string();
        let events = match role {
            Role::Any => "on",
            Role::Publisher => "off",
        };
        let url =
            format!("dapr://{hostport}?app_id={app_id}&app_port=0&prefix={prefix}&events={events}");
        let config = DaprConfig::from_url(&url)?;
        let bridge = DaprBridge::new(config)?;
        sidecar.connect_app(bridge.app_port());
        bridge
            .start()
            .await
            .with_context(|| format!("starting app `{app_id}` on its sidecar {hostport}"))?;
        let connection = Connection {
            events: Arc::new(bridge),
            queues: None,
            redacted_url: purista::redact_url(&url),
        };
        Ok((connection, sidecar))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_double_url_selects_the_double() {
        assert!(is_double("dapr://double"));
        assert!(is_double("DAPR://double/"));
        assert!(!is_double("dapr://localhost:3500"));
    }

    #[test]
    fn a_single_sidecar_url_is_refused_and_other_schemes_pass() {
        let err = refuse_single_sidecar("dapr://:tok@localhost:3500").expect_err("one sidecar");
        assert!(err.to_string().contains(DOUBLE_URL), "{err}");
        assert!(!err.to_string().contains("tok@"), "{err}");
        assert!(refuse_single_sidecar("memory://bench").is_ok());
    }
}
