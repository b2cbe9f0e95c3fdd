//! Check cycles run in-process through the library, for tests that count what consecutive
//! cycles of one long-running process cost (a fresh `check` process starts cold each time).

use std::path::Path;
use std::sync::Arc;

use driftwatch::config::Config;
use driftwatch::cycle::{CycleOptions, CycleReport, run_cycle};
use driftwatch::event::DetectedBy;
use driftwatch::registry::Registries;
use driftwatch::store::Store;

/// A config, its registry clients and its state file, as the daemon holds them.
pub struct Cycles {
    pub config: Config,
    pub registries: Arc<Registries>,
    pub store: Store,
}

impl Cycles {
    /// Loads `config` (with `env` as the environment) and opens its state file.
    pub async fn open(config: &Path, env: &[(String, String)]) -> Cycles {
        let config = Config::load_with_env(config, env).expect("a valid config");
        let registries = Arc::new(Registries::new(
            config.registries.clone(),
            config.daemon.concurrency,
            config.daemon.request_timeout,
        ));
        let store = Store::open(&config.daemon.state)
            .await
            .expect("a state file");
        Cycles {
            config,
            registries,
            store,
        }
    }

    /// One polling cycle over every watch, without alerts; the report and the number of
    /// requests it sent to registries (token requests included).
    pub async fn run(&self) -> (CycleReport, u64) {
        let watches: Vec<_> = self.config.watches.iter().map(|w| w.as_ref()).collect();
        let options = CycleOptions {
            route_alerts: false,
            detected_by: DetectedBy::Poll,
        };
        let before = self.registries.requests_sent();
        let report = run_cycle(
            &self.config,
            &self.registries,
            &self.store,
            &watches,
            options,
        )
        .await
        .expect("the store works");
        (report, self.registries.requests_sent() - before)
    }
}
