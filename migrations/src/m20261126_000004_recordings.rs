//! Playable recording links: `recording_links` (one row per link handed out; only the token's
//! SHA-256 and a sealed copy are stored) and the per-tenant link-expiry policy on `tenants`.
//!
//! `current_call_id` holds the call id on the one link that is currently handed out for a call
//! and NULL on revoked or replaced links; its unique index makes "get or create the call's link"
//! race-free on both backends (`INSERT … ON CONFLICT (current_call_id) DO NOTHING`) without a
//! partial index.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("recording_links")
                    .col(string("id").primary_key())
                    .col(string_uniq("token_hash"))
                    .col(text("token_sealed"))
                    .col(string("tenant_id"))
                    .col(string("call_id"))
                    .col(string_null("current_call_id"))
                    .col(big_integer("created_at"))
                    .col(big_integer_null("expires_at"))
                    .col(big_integer_null("revoked_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("recording_links", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from("recording_links", "call_id")
                            .to("calls", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("recording_links_current")
                    .table("recording_links")
                    .col("current_call_id")
                    .unique()
                    .to_owned(),
            )
            .await?;
        // "Revoke one call's links" and "revoke all of a tenant's links" scan by these.
        manager
            .create_index(
                Index::create()
                    .name("recording_links_tenant_call")
                    .table("recording_links")
                    .col("tenant_id")
                    .col("call_id")
                    .to_owned(),
            )
            .await?;

        // SQLite takes one column per ALTER TABLE, so two statements.
        // true = use the configured default TTL; false = `recording_link_ttl_secs` decides
        // (NULL = links never expire).
        manager
            .alter_table(
                Table::alter()
                    .table("tenants")
                    .add_column(boolean("recording_link_ttl_inherit").default(true))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table("tenants")
                    .add_column(big_integer_null("recording_link_ttl_secs"))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table("recording_links")
                    .if_exists()
                    .to_owned(),
            )
            .await?;
        for column in ["recording_link_ttl_secs", "recording_link_ttl_inherit"] {
            manager
                .alter_table(
                    Table::alter()
                        .table("tenants")
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
