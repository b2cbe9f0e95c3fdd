//! Shared support for driftwatch's integration tests: a real-registry harness, push helpers,
//! a scripted hostile fake registry, and helpers to run the driftwatch binary.
#![allow(dead_code)]
// Re-exports are conveniences; a test file that uses only some of them must not warn.
#![allow(unused_imports)]

pub mod acr;
pub mod cli;
pub mod cycles;
pub mod fake;
pub mod oci;
pub mod otlp;
pub mod process;
pub mod push;
pub mod receiver;
pub mod registry;
pub mod smtp;
pub mod webhooks;

pub use acr::AcrDouble;
pub use cli::{
    DriftwatchProcess, TestDir, driftwatch_bin, driftwatch_command, run_driftwatch,
    spawn_driftwatch, write_config,
};
pub use fake::{Auth, Behavior, FakeRegistry, RecordedRequest, TokenRequest};
pub use oci::{Descriptor, Platform, PushedManifest, sha256_digest};
pub use push::Pusher;
pub use receiver::{Received, Receiver, Respond};
pub use registry::Registry;
pub use smtp::{Mail, MimePart, SmtpServer};
