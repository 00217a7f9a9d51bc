#![allow(unreachable_pub, dead_code)]

//! End-to-end tests of the host over HTTP against fake Exotel and fake receivers on loopback.
//! Every scenario runs on SQLite and on PostgreSQL (`both_backends!`).

mod admin;
mod admin_masking;
mod browser;
mod cli;
mod click_to_call;
mod crm;
mod delivery;
mod fakecrm;
mod helpers;
mod isolation;
#[path = "../../src/bin/callbridge-maskbench.rs"]
mod maskbench;
mod masking;
mod ops;
mod pipedrive_host;
mod reconcile;
mod recordings;
mod smoke;
mod status_callback;
