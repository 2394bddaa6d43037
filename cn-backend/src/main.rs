//! `cn-backend`: the operator's credential service and its administration CLI.
#![warn(missing_docs)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cn_backend::admin::{self, AddSubscriber, PolicyUpdate};
use cn_backend::config::{DEFAULT_DIR, Layout, Settings};
use cn_backend::model::{SubscriptionStatus, Timestamp};
use cn_backend::serve::{ServeOptions, serve};
use cn_backend::service;
use serde::Serialize;

/// The operator's credential service: companion subscriptions, policy, AKA, batch provisioning of IoT credentials
#[derive(Debug, Parser)]
#[command(name = "cn-backend", version)]
struct Cli {
    /// Data directory (configuration, keys, certificates, database).
    #[arg(long, global = true, env = "CN_BACKEND_DIR", default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// The database: `postgres://…` for PostgreSQL (overrides `[store] url` of the
    /// configuration; `init` records it there). Default: the SQLite file of the directory.
    #[arg(long, global = true, env = "CN_BACKEND_STORE")]
    store: Option<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create the data directory: configuration, KEK, OP, operator CA, server certificate,
    /// admin token and database. Refuses an initialised directory.
    Init(InitArgs),
    /// Run the QUIC server (gateways and device attach) and the admin HTTP API.
    Serve(ServeArgs),
    /// Manage companion (parent) subscriptions.
    #[command(subcommand)]
    Subscriber(SubCmd),
    /// Inspect and revoke single child credentials (the admin API's /api/v1/children/...).
    #[command(subcommand)]
    Child(ChildCmd),
    /// Manage the manufacturer roots that attest device keys (PROTOCOL.md §4.5), for parents
    /// with `--require-attestation`.
    #[command(subcommand)]
    Attestation(AttestationCmd),
    /// Show the audit trail (issue, renew, revoke, policy and lifecycle changes).
    Audit {
        /// Only entries about this SUPI (as subject or parent).
        #[arg(long)]
        supi: Option<String>,
        /// Newest N entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
enum ChildCmd {
    /// List the child credentials of one subscription (GET /api/v1/subscribers/{supi}/children).
    List {
        /// The parent subscription's SUPI.
        #[arg(long)]
        parent: String,
    },
    /// Show one child credential with its sync state (GET /api/v1/children/{supi}).
    Show {
        /// The child's SUPI.
        supi: String,
    },
    /// Revoke one child credential (POST /api/v1/children/{supi}/revoke); with
    /// [sync.open5gs], its document is deleted from the core.
    Revoke {
        /// The child's SUPI.
        supi: String,
    },
}

#[derive(Debug, Subcommand)]
enum AttestationCmd {
    /// Trust a manufacturer's device CA (a CA certificate, PEM or DER). Takes effect for the
    /// next batch, without a restart.
    AddRoot {
        /// A name for it (1 to 64 of [A-Za-z0-9._-]).
        #[arg(long)]
        name: String,
        /// The CA certificate file.
        cert: PathBuf,
    },
    /// List the installed roots.
    ListRoots,
    /// Stop trusting a root (issued credentials stay valid).
    RemoveRoot {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Home MCC (3 digits).
    #[arg(long, default_value = "001")]
    mcc: String,
    /// Home MNC (2 or 3 digits).
    #[arg(long, default_value = "01")]
    mnc: String,
    /// First MSIN of the child credential range.
    #[arg(long)]
    imsi_start: Option<u64>,
    /// Number of SUPIs in the child range.
    #[arg(long)]
    imsi_count: Option<u64>,
    /// Name in the server certificate (repeat; the first is the attach server name).
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// QUIC listen address to write to the configuration.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin HTTP listen address to write to the configuration.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// QUIC listen address (default from cn-backend.toml, else 0.0.0.0:4433; port 0 = any).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin HTTP listen address (default from cn-backend.toml, else 127.0.0.1:8480).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Write {"quic":"ip:port","http":"ip:port"} here (atomically) once both are bound.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum SubCmd {
    /// Add a companion subscription.
    Add(AddArgs),
    /// List subscriptions.
    List {
        /// Start after this SUPI (paging).
        #[arg(long)]
        after: Option<String>,
        /// At most N.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Show one subscription with its child credentials.
    Show {
        /// The SUPI.
        supi: String,
    },
    /// Change a subscription's policy (only the options given).
    Policy(PolicyArgs),
    /// Suspend a subscription (revokes its children; resumable).
    Suspend {
        /// The SUPI.
        supi: String,
    },
    /// Resume a suspended subscription.
    Resume {
        /// The SUPI.
        supi: String,
    },
    /// Revoke a subscription for good (revokes its children).
    Revoke {
        /// The SUPI.
        supi: String,
    },
    /// Import subscriptions from CSV in one transaction (all or nothing).
    Import {
        /// The CSV file (header: supi,k,opc|op,amf,sqn,max_children,max_lifetime_s,roaming,dnns[,max_bitrate_kbps][,require_attestation]); `-` reads stdin.
        csv: PathBuf,
    },
}

#[derive(Debug, Args)]
struct AddArgs {
    /// imsi-<MCC><MNC><MSIN>.
    #[arg(long)]
    supi: String,
    /// K, 32 hex digits.
    #[arg(long)]
    k: String,
    /// OPc, 32 hex digits.
    #[arg(
        long,
        conflicts_with = "op_from_operator",
        required_unless_present = "op_from_operator"
    )]
    opc: Option<String>,
    /// Compute OPc from the operator OP in op.key.
    #[arg(long)]
    op_from_operator: bool,
    /// AMF, 4 hex digits.
    #[arg(long, default_value = "8000")]
    amf: String,
    /// Initial SQN_HE.
    #[arg(long, default_value_t = 0)]
    sqn: u64,
    /// Most active child credentials.
    #[arg(long, default_value_t = admin::DEFAULT_MAX_CHILDREN)]
    max_children: u32,
    /// Longest child lifetime (seconds, or e.g. 12h, 30d).
    #[arg(long, default_value = admin::DEFAULT_MAX_LIFETIME)]
    max_lifetime: String,
    /// Whether children may roam.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    roaming: bool,
    /// DNN children may use (repeat; none = any).
    #[arg(long = "dnn")]
    dnns: Vec<String>,
    /// Bitrate cap of children, kbit/s.
    #[arg(long)]
    max_bitrate_kbps: Option<u32>,
    /// Issue only to devices whose key a manufacturer root certifies (`attestation add-root`).
    #[arg(long)]
    require_attestation: bool,
}

#[derive(Debug, Args)]
struct PolicyArgs {
    /// The SUPI.
    supi: String,
    /// Most active child credentials.
    #[arg(long)]
    max_children: Option<u32>,
    /// Longest child lifetime (seconds, or e.g. 12h, 30d).
    #[arg(long)]
    max_lifetime: Option<String>,
    /// Whether children may roam.
    #[arg(long, action = clap::ArgAction::Set)]
    roaming: Option<bool>,
    /// DNN children may use (repeat; replaces the list).
    #[arg(long = "dnn")]
    dnns: Vec<String>,
    /// Allow any DNN (clears the list).
    #[arg(long, conflicts_with = "dnns")]
    any_dnn: bool,
    /// Bitrate cap of children, kbit/s (0 removes the cap).
    #[arg(long)]
    max_bitrate_kbps: Option<u32>,
    /// Require manufacturer attestation for new credentials and renewals (true/false).
    #[arg(long, action = clap::ArgAction::Set)]
    require_attestation: Option<bool>,
}

fn print<T: Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, value).context("writing JSON")?;
        writeln!(out)?;
    } else {
        write!(out, "{}", text(value))?;
    }
    Ok(())
}

fn parent_line(p: &admin::ParentView) -> String {
    format!(
        "{}  {:<9}  max_children={} max_lifetime_s={} roaming={} dnns=[{}] max_bitrate_kbps={}{}\n",
        p.supi,
        p.status,
        p.max_children,
        p.max_lifetime_s,
        p.roaming_allowed,
        p.dnns.join(","),
        p.max_bitrate_kbps
            .map_or_else(|| "none".to_owned(), |b| b.to_string()),
        if p.require_attestation {
            " require_attestation"
        } else {
            ""
        }
    )
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cn-backend: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut layout = Layout::new(&cli.dir);
    layout.store_url = cli.store;
    let json = cli.json;
    match cli.cmd {
        Cmd::Init(a) => {
            let mut s = Settings {
                mcc: a.mcc,
                mnc: a.mnc,
                ..Settings::default()
            };
            if let Some(v) = a.imsi_start {
                s.imsi_start = v;
            }
            if let Some(v) = a.imsi_count {
                s.imsi_count = v;
            }
            if !a.server_names.is_empty() {
                s.server_names = a.server_names;
            }
            if let Some(v) = a.listen {
                s.listen = v;
            }
            if let Some(v) = a.http_listen {
                s.http_listen = v;
            }
            let r = service::init(&layout, &s)
                .with_context(|| format!("initialising {}", layout.dir.display()))?;
            print(json, &r, |r| {
                format!(
                    "initialised {}\n  child SUPIs: {}\n  server names: {}\n  files:\n    {}\nnext: cn-backend --dir {} subscriber add ..., then cn-backend --dir {} serve\n",
                    r.dir,
                    r.imsi_range,
                    r.server_names.join(", "),
                    r.files.join("\n    "),
                    r.dir,
                    r.dir
                )
            })
        }
        Cmd::Serve(a) => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_ansi(false)
                .init();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(serve(
                &layout,
                ServeOptions {
                    listen: a.listen,
                    http_listen: a.http_listen,
                    ready_file: a.ready_file,
                },
            ))
        }
        Cmd::Subscriber(sub) => subscriber(&layout, json, sub),
        Cmd::Child(cmd) => child(&layout, json, cmd),
        Cmd::Attestation(cmd) => {
            let store = &*service::open_store(&layout)?;
            let line = |r: &admin::RootView| {
                format!(
                    "{}  sha256={}  {}  added_at={}\n",
                    r.name, r.fingerprint, r.subject, r.added_at
                )
            };
            match cmd {
                AttestationCmd::AddRoot { name, cert } => {
                    let bytes = std::fs::read(&cert)
                        .with_context(|| format!("reading {}", cert.display()))?;
                    let v = admin::add_root(store, &name, &bytes, Timestamp::now())?;
                    print(json, &v, |v| format!("added manufacturer root {}", line(v)))
                }
                AttestationCmd::ListRoots => {
                    let v = admin::list_roots(store)?;
                    print(json, &v, |v| v.iter().map(line).collect())
                }
                AttestationCmd::RemoveRoot { name } => {
                    admin::remove_root(store, &name)?;
                    print(json, &serde_json::json!({ "removed": name }), |_| {
                        format!("removed manufacturer root {name}\n")
                    })
                }
            }
        }
        Cmd::Audit { supi, limit } => {
            let store = &*service::open_store(&layout)?;
            let v = admin::audit(store, supi.as_deref(), limit)?;
            print(json, &v, |v| {
                v.iter()
                    .map(|a| {
                        format!(
                            "{:>6} {} {:<8} {} actor={}{}{} {}\n",
                            a.id,
                            a.at,
                            a.action,
                            a.supi,
                            a.actor,
                            a.parent
                                .as_ref()
                                .map_or(String::new(), |p| format!(" parent={p}")),
                            a.device_id
                                .as_ref()
                                .map_or(String::new(), |d| format!(" device={d}")),
                            a.detail
                        )
                    })
                    .collect()
            })
        }
    }
}

fn subscriber(layout: &Layout, json: bool, cmd: SubCmd) -> anyhow::Result<()> {
    let store = &*service::open_store(layout)?;
    let now = Timestamp::now();
    let actor = "cli";
    match cmd {
        SubCmd::Add(a) => {
            let op = if a.op_from_operator {
                Some(service::load_op(layout)?)
            } else {
                None
            };
            let req = AddSubscriber {
                supi: a.supi,
                k: a.k,
                opc: a.opc,
                op_from_operator: a.op_from_operator,
                amf: Some(a.amf),
                sqn: Some(a.sqn),
                max_children: Some(a.max_children),
                max_lifetime: Some(a.max_lifetime),
                roaming: Some(a.roaming),
                dnns: a.dnns,
                max_bitrate_kbps: a.max_bitrate_kbps,
                require_attestation: a.require_attestation,
            };
            let v = admin::add_subscriber(store, &req, op.as_ref(), actor, now)?;
            print(json, &v, |v| format!("added {}", parent_line(v)))
        }
        SubCmd::List { after, limit } => {
            let v = admin::list_subscribers(store, after.as_deref(), limit)?;
            print(json, &v, |v| v.iter().map(parent_line).collect())
        }
        SubCmd::Show { supi } => {
            let v = admin::show_subscriber(store, &supi, now)?;
            print(json, &v, |d| {
                let mut s = parent_line(&d.subscriber);
                s += &format!(
                    "  sqn={} amf={} active_children={}\n",
                    d.subscriber.sqn,
                    d.subscriber.amf,
                    d.subscriber.active_children.unwrap_or(0)
                );
                for c in &d.children {
                    s += &format!(
                        "  child {} {:<7} device={} expires_at={} roaming={}{}\n",
                        c.supi,
                        c.state,
                        c.device_id,
                        c.expires_at,
                        c.roaming_allowed,
                        sync_suffix(c)
                    );
                }
                s
            })
        }
        SubCmd::Policy(p) => {
            let upd = PolicyUpdate {
                max_children: p.max_children,
                max_lifetime: p.max_lifetime,
                roaming: p.roaming,
                dnns: if p.any_dnn {
                    Some(Vec::new())
                } else if p.dnns.is_empty() {
                    None
                } else {
                    Some(p.dnns)
                },
                max_bitrate_kbps: p.max_bitrate_kbps,
                require_attestation: p.require_attestation,
            };
            let v = admin::update_policy(store, &p.supi, &upd, actor, now)?;
            print(json, &v, |v| format!("updated {}", parent_line(v)))
        }
        SubCmd::Suspend { supi } => status(store, json, &supi, SubscriptionStatus::Suspended),
        SubCmd::Resume { supi } => status(store, json, &supi, SubscriptionStatus::Active),
        SubCmd::Revoke { supi } => status(store, json, &supi, SubscriptionStatus::Revoked),
        SubCmd::Import { csv } => {
            let n = if csv.as_os_str() == "-" {
                admin::import(store, std::io::stdin().lock(), "cli:import", now)?
            } else {
                let f = std::fs::File::open(&csv)
                    .with_context(|| format!("opening {}", csv.display()))?;
                admin::import(store, std::io::BufReader::new(f), "cli:import", now)?
            };
            print(json, &serde_json::json!({ "imported": n }), |_| {
                format!("imported {n} subscribers\n")
            })
        }
    }
}

/// ` core=<state>` when the credential is synced to a 5G core.
fn sync_suffix(c: &admin::ChildView) -> String {
    c.sync.as_ref().map_or(String::new(), |s| {
        if s.pending > 0 {
            format!(" core={} ({} change(s) to push)", s.state, s.pending)
        } else {
            format!(" core={}", s.state)
        }
    })
}

fn child_line(c: &admin::ChildView) -> String {
    format!(
        "{} {:<7} parent={} device={} issued_at={} expires_at={} roaming={} dnns={} max_bitrate_kbps={}{}\n",
        c.supi,
        c.state,
        c.parent,
        c.device_id,
        c.issued_at,
        c.expires_at,
        c.roaming_allowed,
        if c.dnns.is_empty() {
            "any".to_owned()
        } else {
            c.dnns.join(",")
        },
        c.max_bitrate_kbps
            .map_or("none".to_owned(), |b| b.to_string()),
        sync_suffix(c)
    )
}

fn child(layout: &Layout, json: bool, cmd: ChildCmd) -> anyhow::Result<()> {
    let store = &*service::open_store(layout)?;
    let now = Timestamp::now();
    match cmd {
        ChildCmd::List { parent } => {
            let v = admin::list_children(store, &parent, now)?;
            print(json, &v, |v| v.iter().map(child_line).collect())
        }
        ChildCmd::Show { supi } => {
            let v = admin::show_child(store, &supi, now)?;
            print(json, &v, child_line)
        }
        ChildCmd::Revoke { supi } => {
            let changed = admin::revoke_child(store, &supi, "cli", now)?;
            let v = serde_json::json!({ "supi": supi, "revoked": changed });
            print(json, &v, |_| {
                if changed {
                    format!("{supi}: revoked\n")
                } else {
                    format!("{supi}: already revoked\n")
                }
            })
        }
    }
}

fn status(
    store: &dyn cn_backend::Store,
    json: bool,
    supi: &str,
    to: SubscriptionStatus,
) -> anyhow::Result<()> {
    let v = admin::set_status(store, supi, to, "cli", Timestamp::now())?;
    print(json, &v, |v| {
        format!(
            "{}: {} -> {}; revoked {} child credential(s)\n",
            v.supi,
            v.from,
            v.to,
            v.revoked_children.len()
        )
    })
}
