//! driftwatch watches container registries for drift: tags that move, pinned digests that are
//! deleted, index platforms that change. Every finding is stored with its evidence.
//!
//! How data moves, and which module owns each stage:
//!
//! - [`config`] reads the TOML files and environment into one validated [`config::Config`].
//! - [`model`] holds the pure types: [`model::Reference`], [`model::Digest`], and the evidence
//!   a resolution records.
//! - [`registry`] talks OCI Distribution: auth, HEAD/GET of manifests, verification.
//! - [`resolve`] turns one watched tag or digest into an observation, HEAD first.
//! - [`diff`] compares an observation with the stored state and says what changed (pure).
//! - [`event`] gives changes their CloudEvents envelope; [`alert`] routes them to sinks and
//!   delivers them from the outbox (webhook, email).
//! - [`store`] commits resolutions, events and outbox rows together in SQLite.
//! - [`cycle`] runs one check of a set of watches through all of the above.
//! - [`schedule`] decides when each watch is checked; [`app`] runs the daemon around it, and
//!   [`server`] answers its HTTP endpoints.
//! - [`hooks`] reads inbound registry notifications (ACR webhooks, Event Grid) and finds the
//!   watches they concern; the server triggers early checks of those.
//! - [`telemetry`] exports events, metrics and spans over OTLP, when an endpoint is set.
//! - [`cli`] is the command line on top.

#![deny(missing_docs)]

pub mod alert;
pub mod app;
pub mod cli;
pub mod config;
pub mod cycle;
pub mod diff;
pub mod event;
pub mod hooks;
pub mod model;
pub mod registry;
pub mod resolve;
pub mod schedule;
pub mod server;
pub mod store;
pub mod telemetry;
