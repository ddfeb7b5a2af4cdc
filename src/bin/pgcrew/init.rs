//! `pgcrew init DIR`: scaffold a starter service that links the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use pgcrew::{Error, Result};

/// Flags of `pgcrew init`.
#[derive(Debug, Args)]
#[command(after_help = INIT_EXAMPLES)]
pub struct InitArgs {
    /// The directory to create (it must not exist, or be empty).
    pub dir: PathBuf,
    /// Package name (default: the directory's name).
    #[arg(long)]
    pub name: Option<String>,
}

const INIT_EXAMPLES: &str = "Examples:
  pgcrew init my-service && cd my-service && cargo run
  DATABASE_URL=postgres://me@localhost/app cargo run   # inside the generated service";

const MAIN_RS: &str = include_str!("init/main.rs.tmpl");

fn package_name(raw: &str) -> String {
    let mut out = String::new();
    for c in raw.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out
    } else {
        format!("svc-{}", if out.is_empty() { "pgcrew" } else { &out })
    }
}

/// The pgcrew dependency line: a path to this source checkout when it is still there, else the
/// published version.
fn pgcrew_dependency() -> (String, Option<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    if src.join("Cargo.toml").is_file() && src.join("src/lib.rs").is_file() {
        let p = src
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        (
            format!("pgcrew = {{ path = \"{p}\" }}"),
            Some(src.to_path_buf()),
        )
    } else {
        (format!("pgcrew = \"{}\"", pgcrew::VERSION), None)
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)
        .map_err(|e| Error::invalid("dir", format!("cannot write {}: {e}", path.display())))
}

/// `pgcrew init`.
pub fn exec(args: InitArgs) -> Result<ExitCode> {
    let dir = &args.dir;
    if dir.exists() {
        if !dir.is_dir() {
            return Err(Error::invalid(
                "dir",
                format!("{} exists and is not a directory", dir.display()),
            ));
        }
        let mut entries = std::fs::read_dir(dir)
            .map_err(|e| Error::invalid("dir", format!("cannot read {}: {e}", dir.display())))?;
        if entries.next().is_some() {
            return Err(Error::invalid(
                "dir",
                format!(
                    "{} is not empty: pgcrew init never overwrites files; pick a new directory",
                    dir.display()
                ),
            ));
        }
    }
    let raw = match &args.name {
        Some(n) => n.clone(),
        None => dir
            .canonicalize()
            .unwrap_or_else(|_| dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let name = package_name(&raw);
    let (dep, source) = pgcrew_dependency();
    std::fs::create_dir_all(dir.join("src"))
        .map_err(|e| Error::invalid("dir", format!("cannot create {}: {e}", dir.display())))?;
    let cargo_toml = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [dependencies]\n{dep}\n\
         tokio = {{ version = \"1\", features = [\"macros\", \"rt-multi-thread\", \"signal\", \"time\"] }}\n\
         serde = {{ version = \"1\", features = [\"derive\"] }}\n\
         serde_json = \"1\"\n\n\
         [profile.dev]\ndebug = \"line-tables-only\"\n\n\
         [profile.dev.package.\"*\"]\nopt-level = 1\n\n\
         # A standalone workspace, even when generated inside another one.\n[workspace]\n"
    );
    write(&dir.join("Cargo.toml"), &cargo_toml)?;
    write(
        &dir.join("src/main.rs"),
        &MAIN_RS.replace("{{NAME}}", &name),
    )?;
    write(&dir.join(".gitignore"), "/target\n")?;
    // The same dependency versions as the pgcrew checkout (builds offline from the local cache).
    if let Some(src) = source
        && let Ok(lock) = std::fs::read_to_string(src.join("Cargo.lock"))
    {
        write(&dir.join("Cargo.lock"), &lock)?;
    }
    println!(
        "created Cargo.toml, src/main.rs, .gitignore (package {name}) in {}",
        dir.display()
    );
    println!("  {dep}");
    println!(
        "next:\n  cd {}\n  cargo run            # throwaway PostgreSQL unless DATABASE_URL is set",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
