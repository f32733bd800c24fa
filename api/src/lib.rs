//! clinflow-api: log in, upload documents, read their results.
//!
//! The modules in layers, each importing only from those below it (a test
//! over the module graph keeps it so):
//! - on top, the service: `server` (layers, serve), `openapi` (the
//!   description), `access` (the route table: every operation once, with who
//!   may call it);
//! - the handlers, one module per resource: `login`, `documents`, `batch`,
//!   `care` (break-glass), `consents`, `patients/`, `admin/`, `ops`, `audit_api`,
//!   `health`, `docs`, `console` (the web console's page and files);
//! - the pieces they share: `guard` (authentication and the role check),
//!   `state`, `auth`, `proxies` (the client's address behind a load
//!   balancer), `reauth` (the password asked again), `lockout`, `denials`, `users`, `extract`, `validate`,
//!   `seal`, `scope` (care teams), `idempotency`, `dates`, `telemetry`,
//!   `error`, `error_codes` (every error code, its status and description),
//!   `https` (the api's own TLS: certificate, versions, reload),
//!   `connections` (the connection limit and the slow clients' time limits),
//!   `config`.

pub mod access;
mod admin;
mod audit_api;
pub mod auth;
pub mod batch;
mod care;
pub mod cli;
pub mod config;
mod connections;
mod consents;
mod console;
mod dates;
pub mod denials;
mod docs;
mod documents;
pub mod error;
mod error_codes;
mod extract;
mod guard;
mod health;
pub mod https;
pub mod idempotency;
mod lockout;
mod login;
pub mod openapi;
mod ops;
mod patients;
pub mod proxies;
mod reauth;
mod scope;
mod seal;
mod server;
mod state;
pub mod telemetry;
pub mod users;
mod validate;

pub use server::{app, serve, serve_tls};
pub use state::{AppState, Edge, UploadLimits};
