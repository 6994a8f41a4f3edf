//! Shared test support: a CPython RNG port, the reference suite's manifest generator
//! and a small HTTP server.
#![allow(dead_code, unused_imports)]

pub mod http_server;
pub mod net;
pub mod pyrandom;
pub mod reference_gen;
pub mod sim_stack;

pub use http_server::*;
