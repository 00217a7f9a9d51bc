//! sea-orm entities, one module per table (schema in `migrations/`). Plain data: behaviour lives
//! in the repository modules, whose queries always start from a tenant id.
#![allow(missing_docs, unreachable_pub, clippy::all)]

/// Tenants: one Exotel account each.
pub mod tenant {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub exotel_sid: String,
        pub exotel_api_key: String,
        pub exotel_api_token_sealed: String,
        pub exotel_api_base: String,
        pub caller_id: Option<String>,
        pub default_region: String,
        pub record: bool,
        pub time_limit: Option<i32>,
        pub time_out: Option<i32>,
        pub wait_url: Option<String>,
        pub webhook_url: Option<String>,
        pub webhook_secret_sealed: Option<String>,
        pub api_key_hash: String,
        pub api_key_last4: String,
        pub flow_token_hash: String,
        pub flow_token_sealed: String,
        pub created_at: i64,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Agents: a tenant's people and their real phones.
pub mod agent {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "agents")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub name: Option<String>,
        pub phone: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// CRM user → agent mapping.
pub mod agent_crm_user {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "agent_crm_users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub connector: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub crm_user_id: String,
        pub agent_id: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Calls, outbound and inbound, with their final state.
pub mod call {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "calls")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub token_hash: String,
        pub direction: String,
        pub from_number: String,
        pub to_number: String,
        pub caller_id: Option<String>,
        pub custom_field: Option<String>,
        pub record: bool,
        pub exotel_call_sid: Option<String>,
        pub status: String,
        pub error: Option<String>,
        pub started_at: Option<i64>,
        pub ended_at: Option<i64>,
        pub finalized_at: Option<i64>,
        pub final_source: Option<String>,
        pub conversation_duration: Option<i32>,
        pub recording_url: Option<String>,
        pub legs: Option<String>,
        pub final_payload: Option<String>,
        pub created_at: i64,
        pub updated_at: i64,
        /// The CRM installation this call is written back to.
        pub crm_installation_id: Option<String>,
        /// The CRM record (`CrmRecordRef` as JSON) the call was placed from or matched to.
        pub crm_record: Option<String>,
        /// Other CRM records of the click (`Vec<CrmRecordRef>` as JSON).
        pub crm_related: Option<String>,
        /// The agent's user id in that CRM.
        pub crm_user_id: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The durable job queue.
pub mod job {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "jobs")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub tenant_id: String,
        pub kind: String,
        pub call_id: Option<String>,
        pub target: String,
        pub dedupe_key: String,
        pub message_id: String,
        pub state: String,
        pub attempts: i32,
        pub max_attempts: i32,
        pub run_at: i64,
        pub locked_until: Option<i64>,
        pub last_error: Option<String>,
        pub last_status: Option<i32>,
        pub created_at: i64,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One row per delivery attempt, for the call timeline.
pub mod job_attempt {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_attempts")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub job_id: i64,
        pub attempt: i32,
        pub started_at: i64,
        pub duration_ms: i32,
        pub http_status: Option<i32>,
        pub outcome: String,
        pub error: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Number masking: pool, sessions, participants, settings.
pub mod masking;
