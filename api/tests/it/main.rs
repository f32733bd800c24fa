//! Integration tests of clinflow against the real services; see common.rs.
//! One test binary (faster to link than one per file).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access;
mod audit_forgery;
mod audit_table;
mod auditor;
mod auth;
mod backup;
mod batch;
mod broker;
mod common;
mod console;
mod database;
mod edge;
mod health;
mod hostile;
mod https;
mod ingest;
mod jobs;
mod keys;
mod openapi;
mod ops;
mod outbox;
mod patients;
mod pipeline;
mod privacy;
mod schemathesis;
mod startup;
