//! The command line: `serve`, `demo`, `migrate`, `tenant create`, `agent add`,
//! `numbers add`, `admin create`. Output meant for scripts goes to stdout as one JSON object;
//! logs go to stderr.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sea_orm::EntityTrait;

use crate::{Application, config::Config, db, telemetry, tenants};

/// callbridge: Exotel click-to-call and masking for your CRM.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// A TOML config file (default: ./callbridge.toml when it exists).
    #[arg(long, global = true, env = "CALLBRIDGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (migrates first).
    Serve {
        /// Also mount the built-in Exotel simulator and the demo page (never in production).
        #[arg(long)]
        demo: bool,
    },
    /// Run the server with the built-in Exotel simulator and a demo page: no accounts needed.
    Demo,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Manage agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Manage a tenant's virtual-number pool (number masking).
    #[command(subcommand)]
    Numbers(NumbersCmd),
    /// Manage admin console users.
    #[command(subcommand)]
    Admin(AdminCmd),
}

/// `numbers …`
#[derive(Debug, Subcommand)]
pub enum NumbersCmd {
    /// Add virtual numbers (ExoPhones) to a tenant's masking pool; existing ones are kept.
    Add(NumbersAdd),
}

/// `numbers add` arguments.
#[derive(Debug, Args)]
pub struct NumbersAdd {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// The numbers, E.164 or national in the tenant's region.
    #[arg(required = true)]
    pub numbers: Vec<String>,
}

/// `admin …`
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Create an admin user for a tenant; the password is read from standard input.
    Create(AdminCreate),
}

/// `admin create` arguments.
#[derive(Debug, Args)]
pub struct AdminCreate {
    /// Tenant id (`ten_…`).
    #[arg(long)]
    pub tenant: String,
    /// The admin's email (unique across the installation).
    #[arg(long)]
    pub email: String,
    /// Read the password from the first line of standard input without prompting (for
    /// scripts). Without it, a terminal is prompted twice with echo off.
    #[arg(long)]
    pub password_stdin: bool,
}

/// `tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create a tenant; prints its API key and flow URLs once.
    Create(TenantCreate),
}

/// `tenant create` arguments.
#[derive(Debug, Args)]
pub struct TenantCreate {
    /// Display name.
    #[arg(long)]
    pub name: String,
    /// Exotel account SID.
    #[arg(long)]
    pub exotel_sid: String,
    /// Exotel API key.
    #[arg(long)]
    pub exotel_api_key: String,
    /// Exotel API token (sealed at rest).
    #[arg(long)]
    pub exotel_api_token: String,
    /// Exotel API base: https://api.exotel.com (Singapore) or https://api.in.exotel.com (Mumbai).
    #[arg(long)]
    pub exotel_api_base: Option<String>,
    /// Default virtual number (ExoPhone) shown to both parties.
    #[arg(long)]
    pub caller_id: Option<String>,
    /// Where finished calls are delivered (signed, Standard Webhooks).
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Region for national numbers (default: CALLBRIDGE_DEFAULT_REGION).
    #[arg(long)]
    pub region: Option<String>,
}

/// `agent …`
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Add (or update) an agent's phone and CRM user mappings.
    Add(AgentAdd),
}

/// `agent add` arguments.
#[derive(Debug, Args)]
pub struct AgentAdd {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// The agent's real phone.
    #[arg(long)]
    pub phone: String,
    /// Display name.
    #[arg(long)]
    pub name: Option<String>,
    /// CONNECTOR:USER_ID, repeatable (e.g. pipedrive:12345).
    #[arg(long = "crm-user")]
    pub crm_user: Vec<String>,
}

/// Run the parsed command.
///
/// # Errors
/// Anything that went wrong, with context; `main` prints it and exits non-zero.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config)?;
    telemetry::init(&config.log_format);
    match cli.command {
        Command::Serve { demo: false } => Application::build(config, None).await?.run(true).await,
        Command::Serve { demo: true } | Command::Demo => {
            Application::build_demo(config).await?.run(true).await
        }
        Command::Migrate => {
            let db = db::connect(&config).await?;
            db::migrate(&db).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Tenant(TenantCmd::Create(a)) => {
            let sealer = crate::load_sealer(&config)?;
            let db = db::connect(&config).await?;
            db::migrate(&db).await?;
            let created = tenants::create(
                &db,
                &sealer,
                &config.public_base(),
                &config.default_region,
                tenants::NewTenant {
                    name: a.name,
                    exotel_sid: a.exotel_sid,
                    exotel_api_key: a.exotel_api_key,
                    exotel_api_token: a.exotel_api_token,
                    exotel_api_base: a.exotel_api_base,
                    caller_id: a.caller_id,
                    webhook_url: a.webhook_url,
                    default_region: a.region,
                },
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&created)?);
            Ok(())
        }
        Command::Admin(AdminCmd::Create(a)) => {
            let password = read_password(a.password_stdin)?;
            let db = db::connect(&config).await?;
            db::migrate(&db).await?;
            let user = crate::admin::users::create(&db, &a.tenant, &a.email, &password)
                .await
                .context("creating the admin user")?;
            println!(
                "{}",
                serde_json::json!({"admin_user_id": user.id, "tenant_id": user.tenant_id,
                                   "email": user.email})
            );
            Ok(())
        }
        Command::Agent(AgentCmd::Add(a)) => {
            let db = db::connect(&config).await?;
            db::migrate(&db).await?;
            let agent = tenants::add_agent(
                &db,
                tenants::NewAgent {
                    tenant_id: a.tenant,
                    phone: a.phone,
                    name: a.name,
                    crm_users: a.crm_user,
                },
            )
            .await
            .context("adding the agent")?;
            println!(
                "{}",
                serde_json::json!({"agent_id": agent.id, "tenant_id": agent.tenant_id,
                                   "phone": agent.phone, "name": agent.name})
            );
            Ok(())
        }
        Command::Numbers(NumbersCmd::Add(a)) => {
            let db = db::connect(&config).await?;
            db::migrate(&db).await?;
            let tenant = crate::entities::tenant::Entity::find_by_id(a.tenant.clone())
                .one(&db)
                .await?
                .with_context(|| format!("no tenant {}", a.tenant))?;
            let numbers = crate::masking::normalise_numbers(&a.numbers, &tenant.default_region)
                .map_err(anyhow::Error::msg)?;
            let added = crate::masking::add_numbers(&db, &tenant.id, &numbers)
                .await
                .context("adding the numbers")?;
            let (new, existing): (Vec<_>, Vec<_>) = added.into_iter().partition(|(_, n)| *n);
            println!(
                "{}",
                serde_json::json!({
                    "tenant_id": tenant.id,
                    "added": new.into_iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    "already_in_pool": existing.into_iter().map(|(n, _)| n).collect::<Vec<_>>(),
                })
            );
            Ok(())
        }
    }
}

/// The new admin's password: one line from standard input (`--password-stdin` or a pipe), or a
/// no-echo prompt, asked twice, on a terminal.
fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    let password = if from_stdin || !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        let first = rpassword::prompt_password("Password (at least 12 characters): ")
            .context("reading the password")?;
        let second =
            rpassword::prompt_password("Repeat the password: ").context("reading the password")?;
        if first != second {
            anyhow::bail!("the two passwords differ");
        }
        first
    };
    if password.is_empty() {
        anyhow::bail!(
            "no password given: pipe it on standard input (e.g. `… --password-stdin < file`)"
        );
    }
    crate::admin::users::check_password_policy(&password)?;
    Ok(password)
}
