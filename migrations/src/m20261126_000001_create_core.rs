//! The foundation: tenants, agents, calls, the click debounce table and the durable job queue.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("tenants")
                    .col(string("id").primary_key())
                    .col(string("name"))
                    .col(string("exotel_sid"))
                    .col(string("exotel_api_key"))
                    .col(text("exotel_api_token_sealed"))
                    .col(string("exotel_api_base"))
                    .col(string_null("caller_id"))
                    .col(string("default_region"))
                    .col(boolean("record"))
                    .col(integer_null("time_limit"))
                    .col(integer_null("time_out"))
                    .col(text_null("wait_url"))
                    .col(text_null("webhook_url"))
                    .col(text_null("webhook_secret_sealed"))
                    .col(string_uniq("api_key_hash"))
                    .col(string("api_key_last4"))
                    .col(string_uniq("flow_token_hash"))
                    .col(text("flow_token_sealed"))
                    .col(big_integer("created_at"))
                    .col(big_integer("updated_at"))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("agents")
                    .col(string("id").primary_key())
                    .col(string("tenant_id"))
                    .col(string_null("name"))
                    .col(string("phone"))
                    .col(big_integer("created_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("agents", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("agents_tenant_phone")
                    .table("agents")
                    .col("tenant_id")
                    .col("phone")
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("agent_crm_users")
                    .col(string("tenant_id"))
                    .col(string("connector"))
                    .col(string("crm_user_id"))
                    .col(string("agent_id"))
                    .primary_key(
                        Index::create()
                            .col("tenant_id")
                            .col("connector")
                            .col("crm_user_id"),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from("agent_crm_users", "agent_id")
                            .to("agents", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("calls")
                    .col(string("id").primary_key())
                    .col(string("tenant_id"))
                    .col(string_uniq("token_hash"))
                    .col(string("direction"))
                    .col(string("from_number"))
                    .col(string("to_number"))
                    .col(string_null("caller_id"))
                    .col(text_null("custom_field"))
                    .col(boolean("record"))
                    .col(string_null("exotel_call_sid"))
                    .col(string("status"))
                    .col(text_null("error"))
                    .col(big_integer_null("started_at"))
                    .col(big_integer_null("ended_at"))
                    .col(big_integer_null("finalized_at"))
                    .col(string_null("final_source"))
                    .col(integer_null("conversation_duration"))
                    .col(text_null("recording_url"))
                    .col(text_null("legs"))
                    .col(text_null("final_payload"))
                    .col(integer("reconcile_attempts").default(0))
                    .col(big_integer_null("next_reconcile_at"))
                    .col(big_integer("created_at"))
                    .col(big_integer("updated_at"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("calls", "tenant_id")
                            .to("tenants", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Paging newest-first inside one tenant; ids are UUIDv7 so they sort by creation.
        manager
            .create_index(
                Index::create()
                    .name("calls_tenant_id")
                    .table("calls")
                    .col("tenant_id")
                    .col("id")
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("calls_tenant_sid")
                    .table("calls")
                    .col("tenant_id")
                    .col("exotel_call_sid")
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("calls_reconcile_due")
                    .table("calls")
                    .col("next_reconcile_at")
                    .to_owned(),
            )
            .await?;

        // One live row per (tenant, from, to): a repeated click inside the window finds it and
        // returns the call it guards instead of placing a second one.
        manager
            .create_table(
                Table::create()
                    .table("call_debounce")
                    .col(string("tenant_id"))
                    .col(string("from_number"))
                    .col(string("to_number"))
                    .col(string("call_id"))
                    .col(big_integer("expires_at"))
                    .primary_key(
                        Index::create()
                            .col("tenant_id")
                            .col("from_number")
                            .col("to_number"),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("jobs")
                    .col(big_pk_auto("id"))
                    .col(string("tenant_id"))
                    .col(string("kind"))
                    .col(string_null("call_id"))
                    .col(string("target"))
                    .col(string_uniq("dedupe_key"))
                    .col(string("message_id"))
                    .col(string("state"))
                    .col(integer("attempts").default(0))
                    .col(integer("max_attempts"))
                    .col(big_integer("run_at"))
                    .col(big_integer_null("locked_until"))
                    .col(text_null("last_error"))
                    .col(integer_null("last_status"))
                    .col(big_integer("created_at"))
                    .col(big_integer("updated_at"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("jobs_due")
                    .table("jobs")
                    .col("state")
                    .col("run_at")
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("jobs_call")
                    .table("jobs")
                    .col("call_id")
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("job_attempts")
                    .col(big_pk_auto("id"))
                    .col(big_integer("job_id"))
                    .col(integer("attempt"))
                    .col(big_integer("started_at"))
                    .col(integer("duration_ms"))
                    .col(integer_null("http_status"))
                    .col(string("outcome"))
                    .col(text_null("error"))
                    .foreign_key(
                        ForeignKey::create()
                            .from("job_attempts", "job_id")
                            .to("jobs", "id")
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("job_attempts_job")
                    .table("job_attempts")
                    .col("job_id")
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            "job_attempts",
            "jobs",
            "call_debounce",
            "calls",
            "agent_crm_users",
            "agents",
            "tenants",
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
