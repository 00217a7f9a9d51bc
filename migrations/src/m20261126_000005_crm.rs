//! CRM connectors: `installations` (one per tenant and connector, tokens sealed, a refresh
//! lease for single-flight refresh across instances), `oauth_states` (single-use, bound to the
//! admin session that started the install), `crm_logs` (the CRM's log id per call and
//! installation, so a retry updates instead of writing twice) and the CRM context of a call.
//!
//! `token_version` grows by one on every stored token change: a task that saw version `n` and
//! got a 401 refreshes only if the row still says `n`, otherwise it uses the newer token.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("installations")
                    .col(string("id").primary_key())
                    .col(string("tenant_id"))
                    .col(string("connector"))
                    // `active`, `broken` (reconnect needed).
                    .col(string("status"))
                    .col(string_null("account_id"))
                    .col(text("api_base"))
                    .col(text("vars"))
                    .col(text("settings"))
                    .col(text("access_token_sealed"))
                    .col(text_null("refresh_token_sealed"))
                    .col(big_integer_null("expires_at"))
                    .col(integer("token_version").default(1))
                    .col(big_integer_null("refresh_lease_until"))
                    .col(string_null("refresh_lease_owner"))
                    .col(big_integer_null("last_refresh_at"))
                    .col(text_null("last_error"))
                    .col(big_integer_null("last_error_at"))
                    // `nothing`, `create`, `default_record`.
                    .col(string("unknown_number_rule").default("nothing"))
                    .col(text_null("default_record"))
                    .col(string_null("installed_by"))
                    .col(big_integer("created_at"))
                    .col(big_integer("updated_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("installations", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("installations_tenant_connector")
                    .table("installations")
                    .col("tenant_id")
                    .col("connector")
                    .unique()
                    .to_owned(),
            )
            .await?;
        // Clicks and CRM-initiated uninstalls name the CRM account, not our tenant.
        manager
            .create_index(
                Index::create()
                    .name("installations_connector_account")
                    .table("installations")
                    .col("connector")
                    .col("account_id")
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("oauth_states")
                    .col(string("state_hash").primary_key())
                    .col(string("tenant_id"))
                    .col(string("session_hash"))
                    .col(string("connector"))
                    .col(text_null("pkce_verifier_sealed"))
                    .col(text("vars"))
                    .col(text("redirect_uri"))
                    .col(big_integer("expires_at"))
                    .col(big_integer("created_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("oauth_states", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("crm_logs")
                    .col(string("call_id"))
                    .col(string("installation_id"))
                    .col(string("tenant_id"))
                    .col(string("crm_log_id"))
                    .col(boolean("updatable"))
                    // What the log says now, to skip updates that change nothing.
                    .col(string("written_hash"))
                    .col(boolean("recording_uploaded").default(false))
                    .col(big_integer("created_at"))
                    .col(big_integer("updated_at"))
                    .primary_key(Index::create().col("call_id").col("installation_id"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("crm_logs", "call_id")
                            .to("calls", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        // SQLite takes one column per ALTER TABLE.
        for col in [
            string_null("crm_installation_id"),
            text_null("crm_record"),
            text_null("crm_related"),
            string_null("crm_user_id"),
        ] {
            manager
                .alter_table(Table::alter().table("calls").add_column(col).to_owned())
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            "crm_user_id",
            "crm_related",
            "crm_record",
            "crm_installation_id",
        ] {
            manager
                .alter_table(Table::alter().table("calls").drop_column(col).to_owned())
                .await?;
        }
        for t in ["crm_logs", "oauth_states", "installations"] {
            manager
                .drop_table(Table::drop().table(t).to_owned())
                .await?;
        }
        Ok(())
    }
}
