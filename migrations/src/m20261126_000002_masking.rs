//! Number masking over a virtual-number pool: the pool, masking sessions and their
//! participants, the live routing keys (caller-based allocations and PINs), the cool-off log,
//! per-tenant masking settings, and the index behind the reverse call flow.
//!
//! "Active" is modelled portably (SQLite has partial indexes, but sea-query's builder and the
//! two backends disagree on them): a row in `masking_allocations` / `masking_pins` exists only
//! while its session routes. Closing or expiring a session deletes those rows (and writes the
//! cool-off), so a plain UNIQUE key on them is the "unique among active sessions" guard.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The tenant's virtual numbers (ExoPhones), E.164.
        manager
            .create_table(
                Table::create()
                    .table("masking_numbers")
                    .col(string("tenant_id"))
                    .col(string("number"))
                    .col(big_integer("created_at"))
                    .primary_key(Index::create().col("tenant_id").col("number"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("masking_numbers", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("masking_sessions")
                    .col(string("id").primary_key())
                    .col(string("tenant_id"))
                    .col(string("mode"))
                    .col(string("virtual_number"))
                    .col(string("status"))
                    .col(string_null("closed_reason"))
                    .col(big_integer("ttl_seconds"))
                    .col(big_integer("expires_at"))
                    .col(big_integer_null("last_interaction_at"))
                    .col(big_integer("created_at"))
                    .col(big_integer_null("closed_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("masking_sessions", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Paging newest-first inside a tenant (ids are UUIDv7).
        manager
            .create_index(
                Index::create()
                    .name("masking_sessions_tenant_id")
                    .table("masking_sessions")
                    .col("tenant_id")
                    .col("id")
                    .to_owned(),
            )
            .await?;
        // "Is this pool number used by an open session?" and the per-number counts.
        manager
            .create_index(
                Index::create()
                    .name("masking_sessions_tenant_number")
                    .table("masking_sessions")
                    .col("tenant_id")
                    .col("virtual_number")
                    .col("status")
                    .to_owned(),
            )
            .await?;
        // The expiry sweep.
        manager
            .create_index(
                Index::create()
                    .name("masking_sessions_open_expiry")
                    .table("masking_sessions")
                    .col("status")
                    .col("expires_at")
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("masking_participants")
                    .col(string("session_id"))
                    .col(integer("position"))
                    .col(string("tenant_id"))
                    .col(string("number"))
                    .col(string("role"))
                    .col(text_null("crm"))
                    .col(string_null("pin"))
                    .col(boolean("active"))
                    .primary_key(Index::create().col("session_id").col("position"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("masking_participants", "session_id")
                            .to("masking_sessions", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("masking_participants_number")
                    .table("masking_participants")
                    .col("tenant_id")
                    .col("number")
                    .to_owned(),
            )
            .await?;

        // Caller-based routing keys: one row per active (participant, virtual number) pair.
        // The primary key is the rule "a participant never has the same virtual number in two
        // active sessions", and the lookup index for dial-whom.
        manager
            .create_table(
                Table::create()
                    .table("masking_allocations")
                    .col(string("tenant_id"))
                    .col(string("number"))
                    .col(string("virtual_number"))
                    .col(string("session_id"))
                    .col(string("counterpart"))
                    .primary_key(
                        Index::create()
                            .name("masking_allocations_active_pair")
                            .col("tenant_id")
                            .col("number")
                            .col("virtual_number"),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("masking_allocations_session")
                    .table("masking_allocations")
                    .col("session_id")
                    .to_owned(),
            )
            .await?;

        // PIN routing keys: a PIN is unique among the active sessions on one virtual number.
        manager
            .create_table(
                Table::create()
                    .table("masking_pins")
                    .col(string("tenant_id"))
                    .col(string("virtual_number"))
                    .col(string("pin"))
                    .col(string("session_id"))
                    .col(string("owner"))
                    .col(string("counterpart"))
                    .primary_key(
                        Index::create()
                            .name("masking_pins_active_pin")
                            .col("tenant_id")
                            .col("virtual_number")
                            .col("pin"),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("masking_pins_session")
                    .table("masking_pins")
                    .col("session_id")
                    .to_owned(),
            )
            .await?;

        // When a pair was last released: the number is not handed to the same participant
        // again until the cool-off has passed.
        manager
            .create_table(
                Table::create()
                    .table("masking_cooloffs")
                    .col(string("tenant_id"))
                    .col(string("number"))
                    .col(string("virtual_number"))
                    .col(big_integer("released_at"))
                    .primary_key(
                        Index::create()
                            .col("tenant_id")
                            .col("number")
                            .col("virtual_number"),
                    )
                    .to_owned(),
            )
            .await?;

        // Per-tenant overrides of the masking defaults (NULL = the configured default).
        manager
            .create_table(
                Table::create()
                    .table("masking_settings")
                    .col(string("tenant_id").primary_key())
                    .col(string_null("dial_format"))
                    .col(string_null("fallback_number"))
                    .col(boolean_null("pin_caller_check"))
                    .col(integer_null("passthru_branch_on_unanswered"))
                    .col(big_integer("updated_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("masking_settings", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        // Reverse call flow: "who last called this customer from this virtual number".
        manager
            .create_index(
                Index::create()
                    .name("calls_reverse_flow")
                    .table("calls")
                    .col("tenant_id")
                    .col("to_number")
                    .col("caller_id")
                    .col("created_at")
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("calls_reverse_flow")
                    .table("calls")
                    .to_owned(),
            )
            .await?;
        for table in [
            "masking_settings",
            "masking_cooloffs",
            "masking_pins",
            "masking_allocations",
            "masking_participants",
            "masking_sessions",
            "masking_numbers",
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
