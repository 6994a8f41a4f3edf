//! Shared test support: a CPython RNG port and a small HTTP server.
#![allow(dead_code, unused_imports)]

pub mod http_server;
pub mod pyrandom;

pub use http_server::*;
