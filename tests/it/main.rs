//! The integration suite: one test binary (one link step) with a module per subject. Every
//! test runs real parts: a WebSocket server on loopback (port 0), real clients, temp dirs.

mod common;

mod access;
mod api_docs;
mod backup;
mod bad_input;
mod cache;
mod crash;
mod demo;
mod devices;
mod examples;
mod fixtures;
mod hardening;
mod js_client;
mod metrics;
mod migrate;
mod nodes;
mod operations;
mod projection;
mod records;
mod relay;
mod reports;
mod shutdown;
mod web;
