//! callbridge's schema, one file per migration, written with sea-query builders so the same
//! migration runs on SQLite and PostgreSQL. A migration that has shipped is never edited: add a
//! new one instead.
//!
//! Conventions: ids are prefixed text (`ten_…`, `call_…`) except the job queue's integer ids;
//! every timestamp is an `i64` of Unix milliseconds (UTC), which compares the same way on both
//! backends and keeps the queue's `run_at <= now` predicates index-friendly.

#![allow(elided_lifetimes_in_paths)] // sea-orm-migration's trait elides SchemaManager's lifetime

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_create_core;
mod m20261126_000002_masking;
mod m20261126_000003_admin;
mod m20261126_000004_recordings;
mod m20261126_000005_crm;
mod m20261126_000006_reconcile_queue;

/// The list of migrations, in order.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_create_core::Migration),
            Box::new(m20261126_000002_masking::Migration),
            Box::new(m20261126_000003_admin::Migration),
            Box::new(m20261126_000004_recordings::Migration),
            Box::new(m20261126_000005_crm::Migration),
            Box::new(m20261126_000006_reconcile_queue::Migration),
        ]
    }
}
