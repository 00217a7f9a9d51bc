//! The admin console: admin users (argon2id PHC hashes), their sessions (only the SHA-256 of
//! the session id is stored) and the login-failure counters that rate-limit password guessing.
//!
//! Emails are unique across the whole installation (not per tenant): one login form with no
//! tenant field, and an admin account always belongs to exactly one tenant.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("admin_users")
                    .col(string("id").primary_key())
                    .col(string("tenant_id"))
                    .col(string_uniq("email"))
                    .col(text("password_hash"))
                    .col(big_integer("created_at"))
                    .col(big_integer_null("last_login_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("admin_users", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("admin_sessions")
                    .col(string("id").primary_key())
                    .col(string("admin_user_id"))
                    .col(string("tenant_id"))
                    .col(string("csrf_token"))
                    .col(big_integer("created_at"))
                    .col(big_integer("expires_at"))
                    .col(big_integer("last_seen_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("admin_sessions", "admin_user_id")
                            .to("admin_users", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("admin_sessions_expires")
                    .table("admin_sessions")
                    .col("expires_at")
                    .to_owned(),
            )
            .await?;

        // One row per throttled key (`email:…` or `ip:…`): failures inside the current window.
        manager
            .create_table(
                Table::create()
                    .table("admin_login_failures")
                    .col(string("key").primary_key())
                    .col(big_integer("window_start"))
                    .col(integer("failures"))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in ["admin_login_failures", "admin_sessions", "admin_users"] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
