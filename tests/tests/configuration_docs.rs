//! The README's configuration tables and the binaries' own setting definitions (clap) say the
//! same: every variable documented, none documented that is not read, the same defaults, and
//! each flag named as its variable.

use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory as _;
use flare_storage_e2e::binary;

/// The rows of the table under `heading` in the README: each variable of the row's first
/// cell with the row's default cell.
fn table(heading: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let start = readme.find(&format!("\n{heading}\n")).ok_or_else(|| anyhow::anyhow!("no {heading}"))?;
    let mut rows = BTreeMap::new();
    for line in readme[start..].lines().skip(2).skip_while(|line| !line.starts_with('|')) {
        let Some(row) = line.strip_prefix('|') else { break };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for variable in cells[0].split('`').skip(1).step_by(2) {
            if variable.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
                rows.insert(variable.to_owned(), cells.get(1).copied().unwrap_or_default().to_owned());
            }
        }
    }
    anyhow::ensure!(!rows.is_empty(), "no rows under {heading}");
    Ok(rows)
}

/// Every setting of `command` with an environment variable: variable → default, checking
/// that its flag is the variable's name.
fn settings(command: clap::Command) -> BTreeMap<String, Option<String>> {
    let mut settings = BTreeMap::new();
    for arg in command.get_arguments() {
        let Some(variable) = arg.get_env() else { continue };
        let variable = variable.to_string_lossy().into_owned();
        let flag = arg.get_long().unwrap_or_default();
        assert_eq!(flag.replace('-', "_").to_uppercase(), variable, "--{flag} is read from {variable}");
        let default = arg.get_default_values().first().map(|value| value.to_string_lossy().into_owned());
        settings.insert(variable, default);
    }
    settings
}

fn check(heading: &str, command: clap::Command) -> anyhow::Result<()> {
    let documented = table(heading)?;
    let defined = settings(command);
    let documented_names: BTreeSet<&String> = documented.keys().collect();
    let defined_names: BTreeSet<&String> = defined.keys().collect();
    assert_eq!(documented_names, defined_names, "{heading}: documented vs read");
    for (variable, default) in &defined {
        let cell = &documented[variable];
        if cell.is_empty() {
            continue; // a row shared with other variables ("as for the writer")
        }
        match default {
            Some(default) => {
                assert!(
                    cell.starts_with(&format!("`{default}`")),
                    "{heading} {variable}: default {default}, README {cell}"
                )
            }
            None => assert!(cell.starts_with('—'), "{heading} {variable} has no default, README says {cell}"),
        }
    }
    Ok(())
}

#[test]
fn the_writer_table_is_the_writer_settings() -> anyhow::Result<()> {
    check("### Writer", flare_storage_writer::Settings::command())
}

#[test]
fn the_reader_table_is_the_reader_settings() -> anyhow::Result<()> {
    check("### Reader", flare_storage_reader::Settings::command())
}

/// The operator command's variables, as its `--help` lists them per subcommand.
#[test]
fn the_operator_command_table_lists_every_variable_it_reads() -> anyhow::Result<()> {
    let documented = table("### Operator command")?;
    let help = |args: &[&str]| -> anyhow::Result<String> {
        let output = std::process::Command::new(binary("flare-storage")?).args(args).env_clear().output()?;
        anyhow::ensure!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8(output.stdout)?)
    };
    let overview = help(&["--help"])?;
    let subcommands: Vec<&str> = overview
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert!(subcommands.len() >= 8, "{subcommands:?}");
    let mut read = BTreeSet::new();
    for subcommand in subcommands {
        for variable in help(&[subcommand, "--help"])?.split("[env: ").skip(1) {
            let name: String = variable.chars().take_while(|c| c.is_ascii_uppercase() || *c == '_').collect();
            read.insert(name);
        }
    }
    let documented: BTreeSet<String> = documented.into_keys().collect();
    assert_eq!(read, documented, "variables flare-storage reads vs its README table");
    Ok(())
}

/// What only the real process shows: settings after the subcommand, empty variables as unset
/// (in subcommands too), and a bad value as one line with exit code 2 that never echoes a
/// secret.
#[test]
fn the_binaries_take_settings_as_operators_write_them() -> anyhow::Result<()> {
    let run = |name: &str, args: &[&str], environment: &[(&str, &str)]| -> anyhow::Result<(i32, String)> {
        let output = std::process::Command::new(binary(name)?)
            .args(args)
            .env_clear()
            .envs(environment.iter().copied())
            .output()?;
        Ok((output.status.code().unwrap_or(-1), String::from_utf8(output.stderr)?))
    };
    let (code, stderr) = run("flare-storage-writer", &["run", "--kafka-topic", "x"], &[("WRITER_BATCH_SIZE", " ")])?;
    assert_eq!(
        (code, stderr.as_str()),
        (
            2,
            "flare-storage-writer: configuration error: set POSTGRES_URL, MONGO_URL or both: messages need a database\n"
        )
    );
    let (code, stderr) = run("flare-storage-reader", &[], &[("POSTGRES_URL", "mysql://app:s3cret@db/x")])?;
    assert_eq!(code, 2);
    assert!(!stderr.contains("s3cret") && stderr.contains("'--postgres-url <POSTGRES_URL>'"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (code, stderr) = run("flare-storage", &["reindex-mongo"], &[("MONGO_DATABASE", ""), ("MONGO_URL", "x")])?;
    assert_eq!(code, 2);
    assert!(stderr.contains("--mongo-url <MONGO_URL>") && !stderr.contains("MONGO_DATABASE"), "{stderr}");
    let (code, stderr) = run("flare-storage", &["migrate"], &[])?;
    assert_eq!(
        (code, stderr.as_str()),
        (
            2,
            "flare-storage: configuration error: the following required arguments were not provided: --postgres-url <POSTGRES_URL>\n"
        )
    );
    let (code, stderr) = run("flare-storage-reader", &["--log-format", "xml"], &[("POSTGRES_URL", "postgres://h/d")])?;
    assert_eq!(code, 2);
    assert!(
        stderr.ends_with("invalid value 'xml' for '--log-format <LOG_FORMAT>': must be text or json\n"),
        "{stderr}"
    );
    Ok(())
}
