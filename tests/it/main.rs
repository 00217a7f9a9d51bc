#![allow(unreachable_pub, dead_code)]

//! End-to-end tests of the host over HTTP against fake Exotel and fake receivers on loopback.
//! Every scenario runs on SQLite and on PostgreSQL (`both_backends!`).

mod admin;
mod browser;
mod helpers;
#[path = "../../src/bin/callbridge-maskbench.rs"]
mod maskbench;
mod masking;
mod recordings;
mod cli;
mod click_to_call;
mod delivery;
mod isolation;
mod ops;
mod reconcile;
mod smoke;
mod status_callback;
