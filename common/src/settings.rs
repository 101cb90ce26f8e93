//! Settings of the binaries: each is a command-line flag and an environment variable of the
//! same name (`--writer-batch-size` / `WRITER_BATCH_SIZE`), declared once with clap, so
//! `--help`, the defaults and the README table come from one definition.
//!
//! Values are trimmed (a Secret made from a file often ends in a newline), and a variable
//! that is set but empty counts as unset, as Kubernetes manifests and compose files often
//! leave optional settings empty. A value that cannot be used is one line naming the flag and
//! the variable; the binaries exit with code 2.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgMatches, Command, FromArgMatches};

/// A setting that is missing or cannot be used; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The databases of both services: PostgreSQL, MongoDB or both (the same the writer writes
/// and the reader reads).
#[derive(clap::Args, Clone)]
pub struct DatabaseArgs {
    /// postgres://user:pass@host:port/db; at least one of POSTGRES_URL and MONGO_URL.
    #[arg(long, env = "POSTGRES_URL", hide_env_values = true, value_parser = parse::postgres_url)]
    pub postgres_url: Option<String>,
    /// mongodb://host:port/...; at least one of POSTGRES_URL and MONGO_URL.
    #[arg(long, env = "MONGO_URL", hide_env_values = true, value_parser = parse::mongo_url)]
    pub mongo_url: Option<String>,
    /// MongoDB database.
    #[arg(long, env = "MONGO_DATABASE", default_value = "flare_im", value_parser = parse::text)]
    pub mongo_database: String,
    /// MongoDB collection of messages.
    #[arg(long, env = "MONGO_COLLECTION", default_value = "messages", value_parser = parse::text)]
    pub mongo_collection: String,
}

/// The Redis settings both services share: whether `REDIS_URL` is a cluster, and the hot
/// windows, which the writer keeps and the reader refills (both must use the same values).
#[derive(clap::Args, Clone)]
pub struct RedisArgs {
    /// `REDIS_URL` is a seed node of a Redis Cluster (several comma-separated URLs always are).
    #[arg(long, env = "REDIS_CLUSTER", default_value = "false", value_parser = parse::boolean)]
    pub redis_cluster: bool,
    /// Lifetime of a session's hot window after its last write, in seconds.
    #[arg(long, env = "REDIS_HOT_TTL_SECONDS", default_value = "3600", value_parser = parse::seconds)]
    pub redis_hot_ttl_seconds: Duration,
    /// Newest messages kept per session in its hot window.
    #[arg(long, env = "REDIS_HOT_MAX_MESSAGES", default_value = "200", value_parser = parse::positive::<usize>)]
    pub redis_hot_max_messages: usize,
    /// Replicas that must acknowledge a write to Redis before it counts as done (0: none): a
    /// writer's batch before its offsets are committed, a reader's command before its reply.
    #[arg(long, env = "REDIS_WAIT_REPLICAS", default_value = "0", value_parser = parse::number_of::<usize>)]
    pub redis_wait_replicas: usize,
}

/// Where a service finds its MongoDB messages.
#[derive(Clone, Debug)]
pub struct MongoConfig {
    pub url: String,
    pub database: String,
    pub collection: String,
}

impl DatabaseArgs {
    /// The PostgreSQL URL and MongoDB collection; at least one is required.
    pub fn into_configs(self) -> Result<(Option<String>, Option<MongoConfig>), ConfigError> {
        let mongo = self.mongo_url.map(|url| MongoConfig {
            url,
            database: self.mongo_database,
            collection: self.mongo_collection,
        });
        if self.postgres_url.is_none() && mongo.is_none() {
            return Err(ConfigError("set POSTGRES_URL, MONGO_URL or both: messages need a database".into()));
        }
        Ok((self.postgres_url, mongo))
    }
}

/// Parses the process's arguments and environment into `T`. `--help` and `--version` end the
/// process as clap does; an error prints one line, prefixed by the binary's name, and exits
/// with code 2.
pub fn parse<T: clap::Parser>() -> T {
    let command = prepare(T::command(), true);
    let name = command.get_name().to_owned();
    let parsed = command
        .clone()
        .try_get_matches_from(std::env::args_os())
        .and_then(|mut matches| T::from_arg_matches_mut(&mut matches));
    match parsed {
        Ok(parsed) => parsed,
        Err(error) => match error.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => error.exit(),
            _ => {
                eprintln!("{name}: configuration error: {}", describe(&command, &error));
                std::process::exit(2);
            }
        },
    }
}

/// Readies `command` and its subcommands for parsing: a variable that is set but empty is
/// unset (its argument does not read the environment), and at the top, settings may also
/// follow a subcommand (`flare-storage-writer run --kafka-topic x`).
fn prepare(command: Command, top: bool) -> Command {
    let subcommands: Vec<String> = command.get_subcommands().map(|sub| sub.get_name().to_owned()).collect();
    let global = top && !subcommands.is_empty();
    let mut command = command.mut_args(|arg| {
        let empty = arg
            .get_env()
            .is_some_and(|name| std::env::var_os(name).is_some_and(|value| value.to_string_lossy().trim().is_empty()));
        let arg = if empty { arg.env(None::<&'static str>) } else { arg };
        if global && arg.get_long().is_some() { arg.global(true) } else { arg }
    });
    for name in subcommands {
        command = command.mut_subcommand(name, |sub| prepare(sub, false));
    }
    command
}

/// Parses settings read through `lookup` (an environment as a map: manifests, tests) as if
/// they were the process environment, with no command-line arguments.
pub fn from_lookup<T: FromArgMatches>(
    command: Command,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<T, ConfigError> {
    let mut args: Vec<OsString> = vec![command.get_name().into()];
    for arg in command.get_arguments() {
        let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else { continue };
        let Some(value) = lookup(&name.to_string_lossy()).filter(|value| !value.trim().is_empty()) else { continue };
        args.push(format!("--{long}={value}").into());
    }
    let command = command.mut_args(|arg| arg.env(None::<&'static str>));
    let parsed = command.clone().try_get_matches_from(args);
    parsed
        .and_then(|mut matches: ArgMatches| T::from_arg_matches_mut(&mut matches))
        .map_err(|error| ConfigError(describe(&command, &error)))
}

/// clap's message on one line, without its usage hint (`invalid value 'x' for '--flag
/// <VARIABLE>': why`; `the following required arguments were not provided: --flag
/// <VARIABLE>`), and without the value when the setting is a secret (URLs may carry
/// passwords, tokens are passwords).
fn describe(command: &Command, error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let message: Vec<&str> = rendered.lines().take_while(|line| !line.trim().is_empty()).map(str::trim).collect();
    let message = message.join(" ");
    let mut message = message.strip_prefix("error: ").unwrap_or(&message).to_owned();
    if let (Some(ContextValue::String(invalid)), Some(ContextValue::String(value))) =
        (error.get(ContextKind::InvalidArg), error.get(ContextKind::InvalidValue))
    {
        let secret = all_arguments(command).any(|arg| {
            arg.is_hide_env_values_set()
                && arg.get_long().is_some_and(|long| invalid.starts_with(&format!("--{long} ")))
        });
        if secret && !value.is_empty() {
            message = message.replace(&format!("'{value}'"), "(not shown: a secret)");
        }
    }
    message
}

fn all_arguments(command: &Command) -> Box<dyn Iterator<Item = &clap::Arg> + '_> {
    Box::new(command.get_arguments().chain(command.get_subcommands().flat_map(all_arguments)))
}

/// Value parsers: each trims, and says what it expected.
pub mod parse {
    use super::*;

    pub fn text(value: &str) -> Result<String, String> {
        match value.trim() {
            "" => Err("must not be empty".into()),
            trimmed => Ok(trimmed.to_owned()),
        }
    }

    pub fn number(value: &str) -> Result<u64, String> {
        value.trim().parse().map_err(|_| "must be a non-negative integer".into())
    }

    /// A non-negative integer that fits `T`.
    pub fn number_of<T: TryFrom<u64>>(value: &str) -> Result<T, String> {
        T::try_from(number(value)?).map_err(|_| "is too large".into())
    }

    /// An integer above zero that fits `T` (sizes, counts).
    pub fn positive<T: TryFrom<u64>>(value: &str) -> Result<T, String> {
        match number(value)? {
            0 => Err("must be greater than 0".into()),
            value => T::try_from(value).map_err(|_| "is too large".into()),
        }
    }

    pub fn seconds(value: &str) -> Result<Duration, String> {
        positive(value).map(Duration::from_secs)
    }

    pub fn millis(value: &str) -> Result<Duration, String> {
        positive(value).map(Duration::from_millis)
    }

    pub fn address(value: &str) -> Result<SocketAddr, String> {
        value.trim().parse().map_err(|_| "must be host:port".into())
    }

    fn url(value: &str, schemes: &[&str]) -> Result<String, String> {
        let value = text(value)?;
        if schemes.iter().any(|scheme| value.starts_with(&format!("{scheme}://"))) {
            return Ok(value);
        }
        let expected: Vec<String> = schemes.iter().map(|scheme| format!("{scheme}://")).collect();
        Err(format!("must start with {}", expected.join(" or ")))
    }

    pub fn postgres_url(value: &str) -> Result<String, String> {
        url(value, &["postgres", "postgresql"])
    }

    pub fn mongo_url(value: &str) -> Result<String, String> {
        url(value, &["mongodb", "mongodb+srv"])
    }

    /// One `redis://` URL, or several separated by commas (seed nodes of a cluster).
    pub fn redis_url(value: &str) -> Result<String, String> {
        let urls: Vec<String> =
            value.split(',').map(|item| url(item, &["redis", "rediss"])).collect::<Result<_, _>>()?;
        Ok(urls.join(","))
    }

    pub fn boolean(value: &str) -> Result<bool, String> {
        match value.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("must be true or false".into()),
        }
    }

    pub fn grpc_url(value: &str) -> Result<String, String> {
        url(value, &["http", "https"])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser, Debug)]
    #[command(name = "example")]
    struct Example {
        #[arg(long, env = "EXAMPLE_SIZE", default_value = "3", value_parser = parse::positive::<u32>)]
        example_size: u32,
        #[arg(long, env = "EXAMPLE_URL", hide_env_values = true, value_parser = parse::redis_url)]
        example_url: Option<String>,
        #[arg(long, env = "EXAMPLE_NAME", value_parser = parse::text)]
        example_name: String,
    }

    fn example(vars: &[(&str, &str)]) -> Result<Example, ConfigError> {
        let mut vars: HashMap<&str, &str> = vars.iter().copied().collect();
        vars.entry("EXAMPLE_NAME").or_insert("n");
        from_lookup(Example::command(), |name| vars.get(name).map(|value| (*value).to_owned()))
    }

    #[test]
    fn values_are_trimmed_defaulted_and_checked() {
        assert_eq!(example(&[("EXAMPLE_SIZE", "  7 ")]).expect("7").example_size, 7);
        assert_eq!(example(&[("EXAMPLE_SIZE", " ")]).expect("empty is unset").example_size, 3);
        let error = example(&[("EXAMPLE_SIZE", "0")]).expect_err("zero").to_string();
        assert_eq!(error, "invalid value '0' for '--example-size <EXAMPLE_SIZE>': must be greater than 0");
        let error = example(&[("EXAMPLE_SIZE", "x")]).expect_err("word").to_string();
        assert!(error.contains("EXAMPLE_SIZE") && error.contains("non-negative integer"), "{error}");
        let error = example(&[("EXAMPLE_URL", "http://:pw@h")]).expect_err("scheme").to_string();
        assert_eq!(
            error,
            "invalid value (not shown: a secret) for '--example-url <EXAMPLE_URL>': must start with redis:// or rediss://"
        );
        let error = example(&[("EXAMPLE_NAME", "")]).expect_err("required").to_string();
        assert_eq!(error, "the following required arguments were not provided: --example-name <EXAMPLE_NAME>");
        assert_eq!(example(&[("EXAMPLE_URL", "redis://h\n")]).expect("url").example_url.as_deref(), Some("redis://h"));
        assert_eq!(parse::positive::<u8>("300"), Err("is too large".into()));
        assert!(parse::address("nowhere").is_err());
    }
}
