//! The `wsbridge` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wsbridge::{Config, Gateway};

/// WebSocket gateway to MQTT, AMQP 0-9-1 and Kafka brokers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway (without --config: the embedded default, a memory broker on 127.0.0.1:8080).
    Run {
        /// TOML configuration file.
        #[arg(long, short, env = "WSBRIDGE_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address, overriding `server.listen`.
        #[arg(long, env = "WSBRIDGE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Log as JSON lines instead of text.
        #[arg(long, env = "WSBRIDGE_LOG_JSON")]
        log_json: bool,
    },
    /// Validate a configuration file and print every problem found.
    CheckConfig {
        /// TOML configuration file.
        file: PathBuf,
    },
    /// Print the default configuration, commented.
    PrintConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::PrintConfig => {
            print!("{}", wsbridge::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                println!(
                    "{}: ok ({} backends, {} routes)",
                    file.display(),
                    config.backends().len(),
                    config.routes().len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {} problem(s)", file.display(), e.problems.len());
                for problem in &e.problems {
                    eprintln!("  {problem}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            listen,
            log_json,
        } => {
            init_logging(log_json);
            let config = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{}: invalid configuration:", path.display());
                        for problem in &e.problems {
                            eprintln!("  {problem}");
                        }
                        return ExitCode::FAILURE;
                    }
                },
                None => Config::embedded_default(),
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(config, listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wsbridge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("WSBRIDGE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if json {
        // Each event carries the fields of the span it happened in (a connection's id, edge,
        // client address and subject) and of the spans around it.
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init();
    } else {
        builder.init();
    }
}

async fn run(mut config: Config, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    let gateway = Gateway::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down: closing client connections");
    gateway.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
