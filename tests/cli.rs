//! The operator's CLI, run as the real binary against a temp config, SQLite database and
//! certificate directory: `user ...`, `check-config`, `cert self-signed`, and config errors.
mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use common::{base_config, TestServer, HOSTNAME, PASSWORD};
use submitd::config::ReceivedPolicy;
use submitd::store::users::UserRecord;
use submitd::store::Store;
use tempfile::TempDir;

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts exit 0 and returns stdout.
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        &self.stdout
    }

    /// Asserts a non-zero exit whose stderr contains every one of `needles`.
    #[track_caller]
    fn fails_with(&self, needles: &[&str]) {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "expected failure: {self:#?}"
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr should mention {n:?}: {self:#?}"
            );
        }
    }
}

/// Runs `submitd --config CONFIG ARGS...`; `stdin` is piped in when given, else stdin is
/// /dev/null (never a terminal).
fn submitd(config: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_submitd"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("SUBMITD_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the submitd binary runs");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A temp directory holding `submitd.toml` (the test harness's base config); nothing else
/// exists yet: no database, no certificates.
struct Setup {
    dir: TempDir,
    config: PathBuf,
}

impl Setup {
    fn new() -> Self {
        Self::with_config(|dir| base_config(dir, ""))
    }

    fn with_config(text: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("submitd.toml");
        std::fs::write(&config, text(dir.path())).unwrap();
        Self { dir, config }
    }

    fn run(&self, args: &[&str]) -> Run {
        submitd(&self.config, args, None)
    }

    fn run_stdin(&self, args: &[&str], stdin: &str) -> Run {
        submitd(&self.config, args, Some(stdin))
    }

    fn add_user(&self, email: &str, password: &str) {
        self.run_stdin(
            &["user", "add", email, "--password-stdin"],
            &format!("{password}\n"),
        )
        .ok();
    }

    fn db_path(&self) -> PathBuf {
        self.dir.path().join("data/submitd.db")
    }

    fn db_url(&self) -> String {
        format!("sqlite://{}", self.db_path().display())
    }

    /// The user's row, read through the library's store (not through the CLI).
    fn find_user(&self, email: &str) -> Option<UserRecord> {
        let url = self.db_url();
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let store = Store::open(&url).await.unwrap();
            let user = store.find_user(email).await.unwrap();
            store.close().await;
            user
        })
    }

    /// `user list --json`, parsed.
    fn list_json(&self) -> Vec<serde_json::Value> {
        let out = self.run(&["user", "list", "--json"]);
        let value: serde_json::Value = serde_json::from_str(out.ok())
            .unwrap_or_else(|e| panic!("user list --json is not JSON ({e}): {out:#?}"));
        value.as_array().expect("a JSON array").clone()
    }

    /// The `list --json` entry of one user.
    fn listed(&self, email: &str) -> serde_json::Value {
        self.list_json()
            .into_iter()
            .find(|u| u["email"] == email)
            .unwrap_or_else(|| panic!("{email} not listed"))
    }
}

fn verifies(phc: &str, password: &str) -> bool {
    let hash = PasswordHash::new(phc).expect("a PHC string");
    Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

fn allowed(user: &serde_json::Value) -> Vec<String> {
    user["allowed"]
        .as_array()
        .expect("allowed is an array")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn user_add_works_before_the_server_ever_ran() {
    let s = Setup::new();
    assert!(!s.db_path().exists());
    let out = s.run_stdin(
        &["user", "add", "alice@example.org", "--password-stdin"],
        "s3cret pass\n",
    );
    assert!(out.ok().contains("alice@example.org"), "{out:#?}");
    assert!(s.db_path().exists(), "the CLI created the database");
    // The schema is there: the CLI can list, and the library reads the row back.
    assert_eq!(s.list_json().len(), 1);

    let user = s.find_user("alice@example.org").expect("stored");
    assert!(
        user.password_hash.starts_with("$argon2id$v=19$"),
        "argon2id PHC string: {}",
        user.password_hash
    );
    assert!(
        !user.password_hash.contains("s3cret"),
        "never the password itself"
    );
    assert!(verifies(&user.password_hash, "s3cret pass"));
    assert!(
        !verifies(&user.password_hash, "s3cret pass\n"),
        "the line ending is not part of the password"
    );
    assert!(!user.disabled);
    assert_eq!(user.received, None);
}

#[test]
fn user_add_takes_a_crlf_line_and_normalises_the_domain() {
    let s = Setup::new();
    s.run_stdin(
        &["user", "add", "Bob@Example.ORG", "--password-stdin"],
        "pw with spaces \r\n",
    )
    .ok();
    let user = s
        .find_user("Bob@example.org")
        .expect("stored, domain lowercased");
    assert!(verifies(&user.password_hash, "pw with spaces "));
    // Same account whatever the case of the domain.
    s.run_stdin(
        &["user", "add", "Bob@EXAMPLE.org", "--password-stdin"],
        "x\n",
    )
    .fails_with(&["already exists"]);
}

#[test]
fn duplicate_user_is_refused() {
    let s = Setup::new();
    s.add_user("alice@example.org", "first");
    let out = s.run_stdin(
        &["user", "add", "alice@example.org", "--password-stdin"],
        "second\n",
    );
    out.fails_with(&["alice@example.org", "already exists"]);
    assert!(out.stderr.starts_with("error: "), "{out:#?}");
    let user = s.find_user("alice@example.org").unwrap();
    assert!(
        verifies(&user.password_hash, "first"),
        "the first password stays"
    );
}

#[test]
fn user_add_never_takes_the_password_from_the_command_line() {
    let s = Setup::new();
    // No --password-stdin and no terminal: refuse, and say what to do.
    let out = s.run(&["user", "add", "alice@example.org"]);
    out.fails_with(&["--password-stdin"]);
    // Not as a positional argument, not as an option.
    s.run(&["user", "add", "alice@example.org", "hunter2"])
        .fails_with(&["hunter2"]);
    s.run(&["user", "add", "alice@example.org", "--password", "hunter2"])
        .fails_with(&["--password"]);
    // An empty line is no password.
    s.run_stdin(
        &["user", "add", "alice@example.org", "--password-stdin"],
        "\n",
    )
    .fails_with(&["empty password"]);
    s.run_stdin(
        &["user", "add", "alice@example.org", "--password-stdin"],
        "",
    )
    .fails_with(&["empty password"]);
    assert!(s.list_json().is_empty(), "no user was created");
}

#[test]
fn user_passwd_changes_the_hash_and_refuses_unknown_users() {
    let s = Setup::new();
    s.add_user("alice@example.org", "old password");
    let before = s.find_user("alice@example.org").unwrap();

    s.run_stdin(
        &["user", "passwd", "alice@example.org", "--password-stdin"],
        "new password\n",
    )
    .ok();
    let after = s.find_user("alice@example.org").unwrap();
    assert!(after.password_hash.starts_with("$argon2id$"));
    assert_ne!(before.password_hash, after.password_hash);
    assert!(verifies(&after.password_hash, "new password"));
    assert!(!verifies(&after.password_hash, "old password"));

    s.run_stdin(
        &["user", "passwd", "nobody@example.org", "--password-stdin"],
        "x\n",
    )
    .fails_with(&["no such user", "nobody@example.org"]);
    s.run(&["user", "passwd", "alice@example.org"])
        .fails_with(&["--password-stdin"]);
}

#[test]
fn invalid_addresses_are_refused() {
    let s = Setup::new();
    for bad in ["nodomain", "@example.org", "a@", "a@bad domain", "a@-x.org"] {
        s.run_stdin(&["user", "add", bad, "--password-stdin"], "pw\n")
            .fails_with(&["invalid address"]);
    }
    assert!(s.list_json().is_empty());
    s.add_user("alice@example.org", "pw");
    for bad in ["nodomain", "@", "@bad domain", "x@"] {
        s.run(&["user", "allow", "alice@example.org", bad])
            .fails_with(&["invalid"]);
    }
    assert!(allowed(&s.listed("alice@example.org")).is_empty());
}

#[test]
fn missing_or_unreadable_config_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere/submitd.toml");
    let out = submitd(&missing, &["user", "list"], None);
    out.fails_with(&[&missing.display().to_string()]);

    // A directory where the file should be: unreadable even for root.
    let unreadable = dir.path().join("conf.d");
    std::fs::create_dir(&unreadable).unwrap();
    for args in [&["user", "list"][..], &["check-config"], &["queue", "list"]] {
        submitd(&unreadable, args, None).fails_with(&[&unreadable.display().to_string()]);
    }

    // $SUBMITD_CONFIG stands in for --config.
    let out = Command::new(env!("CARGO_BIN_EXE_submitd"))
        .args(["user", "list"])
        .env("SUBMITD_CONFIG", &missing)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&missing.display().to_string()));
}

#[test]
fn bad_config_text_names_the_problem() {
    let cases: [(&str, &[&str]); 5] = [
        ("hostname = \"unterminated\n", &["submitd.toml"]),
        (
            "hostnme = \"mx.example.org\"\n",
            &["submitd.toml", "hostnme"],
        ),
        ("[limits]\nmax_size = 5\n", &["submitd.toml", "max_size"]),
        (
            "[privacy]\nreceived = \"loud\"\n",
            &["submitd.toml", "loud"],
        ),
        (
            "[limits]\nmax_recipients = 0\n",
            &["submitd.toml", "max_recipients"],
        ),
    ];
    for (text, needles) in cases {
        let s = Setup::with_config(|_| text.to_owned());
        for args in [&["user", "list"][..], &["check-config"]] {
            s.run(args).fails_with(needles);
        }
        assert!(!s.db_path().exists());
    }
}

#[test]
fn user_list_is_an_aligned_table_and_json_for_scripts() {
    let s = Setup::new();
    assert_eq!(s.list_json(), Vec::<serde_json::Value>::new());
    s.add_user("a@example.org", "pw");
    s.add_user("a-much-longer-name@example.org", "pw");
    s.run(&["user", "disable", "a@example.org"]).ok();
    s.run(&["user", "allow", "a@example.org", "@example.net"])
        .ok();
    s.run(&["user", "allow", "a@example.org", "other@x.example"])
        .ok();
    s.run(&["user", "set", "a@example.org", "--received", "keep"])
        .ok();

    let out = s.run(&["user", "list"]);
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{out:#?}");
    assert!(lines[0].starts_with("EMAIL "), "{out:#?}");
    // Every column starts at the same offset on every line.
    for header in ["STATE", "RECEIVED", "ALSO SENDS AS"] {
        let col = lines[0].find(header).unwrap();
        for line in &lines[1..] {
            assert!(
                line.len() > col
                    && line.as_bytes()[col - 1] == b' '
                    && line.as_bytes()[col] != b' '
                    || header == "ALSO SENDS AS" && line.len() <= col,
                "{header} column misaligned in {line:?}\n{}",
                out.stdout
            );
        }
    }
    let row = lines
        .iter()
        .find(|l| l.starts_with("a@example.org "))
        .unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "a@example.org",
            "disabled",
            "keep",
            "@example.net",
            "other@x.example"
        ]
    );
    let row = lines.iter().find(|l| l.starts_with("a-much")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["a-much-longer-name@example.org", "enabled", "default"]
    );

    let users = s.list_json();
    assert_eq!(users.len(), 2);
    let a = s.listed("a@example.org");
    assert_eq!(a["state"], "disabled");
    assert_eq!(a["received"], "keep");
    assert_eq!(allowed(&a), ["@example.net", "other@x.example"]);
    let long = s.listed("a-much-longer-name@example.org");
    assert_eq!(long["state"], "enabled");
    assert!(allowed(&long).is_empty());
    assert!(
        users
            .iter()
            .all(|u| u.get("password_hash").is_none() && !u.to_string().contains("argon2")),
        "no hashes in the listing"
    );
}

#[test]
fn disable_and_enable_change_the_state() {
    let s = Setup::new();
    s.add_user("alice@example.org", "pw");
    assert!(s
        .run(&["user", "disable", "alice@example.org"])
        .ok()
        .contains("disabled"));
    assert!(s.find_user("alice@example.org").unwrap().disabled);
    assert_eq!(s.listed("alice@example.org")["state"], "disabled");
    // Idempotent.
    s.run(&["user", "disable", "alice@example.org"]).ok();
    s.run(&["user", "enable", "alice@example.org"]).ok();
    assert!(!s.find_user("alice@example.org").unwrap().disabled);
    assert_eq!(s.listed("alice@example.org")["state"], "enabled");

    s.run(&["user", "disable", "nobody@example.org"])
        .fails_with(&["nobody@example.org"]);
    s.run(&["user", "enable", "nobody@example.org"])
        .fails_with(&["nobody@example.org"]);
}

#[test]
fn allow_and_deny_sender_addresses() {
    let s = Setup::new();
    s.add_user("alice@example.org", "pw");
    s.run(&["user", "allow", "alice@example.org", "@Example.NET"])
        .ok();
    s.run(&["user", "allow", "alice@example.org", "other@X.example"])
        .ok();
    // Allowing twice is not an error and not a second entry.
    s.run(&["user", "allow", "alice@example.org", "@example.net"])
        .ok();
    assert_eq!(
        allowed(&s.listed("alice@example.org")),
        ["@example.net", "other@x.example"],
        "domains are stored lowercased"
    );

    s.run(&["user", "deny", "alice@example.org", "@example.net"])
        .ok();
    assert_eq!(allowed(&s.listed("alice@example.org")), ["other@x.example"]);
    s.run(&["user", "deny", "alice@example.org", "@example.net"])
        .fails_with(&["@example.net"]);
    s.run(&["user", "deny", "alice@example.org", "other@x.example"])
        .ok();
    assert!(allowed(&s.listed("alice@example.org")).is_empty());

    s.run(&["user", "allow", "nobody@example.org", "@example.net"])
        .fails_with(&["no such user", "nobody@example.org"]);
    s.run(&["user", "deny", "nobody@example.org", "@example.net"])
        .fails_with(&["no such user", "nobody@example.org"]);
}

#[test]
fn user_del_removes_the_user_and_their_addresses() {
    let s = Setup::new();
    s.add_user("alice@example.org", "pw");
    s.add_user("bob@example.org", "pw");
    s.run(&["user", "allow", "alice@example.org", "@example.net"])
        .ok();
    s.run(&["user", "del", "alice@example.org"]).ok();
    assert!(s.find_user("alice@example.org").is_none());
    let users = s.list_json();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["email"], "bob@example.org");
    s.run(&["user", "del", "alice@example.org"])
        .fails_with(&["no such user", "alice@example.org"]);

    // A new account under the same name starts without the old one's addresses.
    s.add_user("alice@example.org", "pw");
    assert!(allowed(&s.listed("alice@example.org")).is_empty());
}

#[test]
fn user_set_received_policy() {
    let s = Setup::new();
    s.add_user("alice@example.org", "pw");
    for (value, stored) in [
        ("keep", Some(ReceivedPolicy::Keep)),
        ("strip", Some(ReceivedPolicy::Strip)),
        ("hide-ip", Some(ReceivedPolicy::HideIp)),
        ("default", None),
    ] {
        s.run(&["user", "set", "alice@example.org", "--received", value])
            .ok();
        assert_eq!(
            s.find_user("alice@example.org").unwrap().received,
            stored,
            "{value}"
        );
        assert_eq!(s.listed("alice@example.org")["received"], value);
    }
    s.run(&["user", "set", "alice@example.org", "--received", "loud"])
        .fails_with(&["loud", "keep, hide-ip, strip or default"]);
    s.run(&["user", "set", "alice@example.org", "--received", "KEEP"])
        .fails_with(&["KEEP"]);
    assert_eq!(s.find_user("alice@example.org").unwrap().received, None);
    s.run(&["user", "set", "nobody@example.org", "--received", "keep"])
        .fails_with(&["nobody@example.org"]);
    s.run(&["user", "set", "alice@example.org"])
        .fails_with(&["--received"]);
}

#[tokio::test]
async fn the_cli_works_while_the_server_runs_on_the_same_database() {
    let server = TestServer::start().await;
    let config = server.config_path.clone();
    let cli = move |args: &'static [&'static str], stdin: Option<&'static str>| {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || submitd(&config, args, stdin))
                .await
                .unwrap()
        }
    };

    // The server already opened (and migrated) the database; the CLI adds to it.
    let added = cli(
        &["user", "add", "carol@example.org", "--password-stdin"],
        Some("correct horse battery staple\n"),
    )
    .await;
    added.ok();
    assert_eq!(PASSWORD, "correct horse battery staple");

    let mut c = server.authenticated("carol@example.org").await;
    c.cmd("QUIT", "221").await;

    // Disabling takes effect for the next login without restarting the server.
    cli(&["user", "disable", "carol@example.org"], None)
        .await
        .ok();
    let mut c = server.client().await;
    c.expect("220").await;
    c.cmd("EHLO client.example", "250").await;
    c.starttls().await;
    c.cmd("EHLO client.example", "250").await;
    c.auth_plain("carol@example.org", PASSWORD, "535").await;
    c.cmd("QUIT", "221").await;
    cli(&["user", "enable", "carol@example.org"], None)
        .await
        .ok();

    // So does a new password.
    cli(
        &["user", "passwd", "carol@example.org", "--password-stdin"],
        Some("a brand new password\n"),
    )
    .await
    .ok();
    let mut c = server.client().await;
    c.expect("220").await;
    c.cmd("EHLO client.example", "250").await;
    c.starttls().await;
    c.cmd("EHLO client.example", "250").await;
    c.auth_plain("carol@example.org", PASSWORD, "535").await;
    c.auth_plain("carol@example.org", "a brand new password", "235 2.7.0")
        .await;
    c.cmd("QUIT", "221").await;

    // And the server's own store sees what the CLI wrote.
    let user = server
        .store
        .find_user("carol@example.org")
        .await
        .unwrap()
        .unwrap();
    assert!(user.password_hash.starts_with("$argon2id$"));
    server.stop().await;
}

#[test]
fn check_config_accepts_a_good_config() {
    let s = Setup::new();
    let certs = s.dir.path().join("certs");
    s.run(&[
        "cert",
        "self-signed",
        "--hostname",
        HOSTNAME,
        "--out-dir",
        certs.to_str().unwrap(),
    ])
    .ok();
    let out = s.run(&["check-config"]);
    assert!(out.ok().contains("ok"), "{out:#?}");
    assert!(
        out.stdout.contains(&s.config.display().to_string()),
        "{out:#?}"
    );
    // No relay is configured: worth a warning, not a failure.
    assert!(out.stderr.contains("warning: "), "{out:#?}");
}

#[test]
fn check_config_names_a_missing_certificate() {
    let s = Setup::new();
    let out = s.run(&["check-config"]);
    let cert = s.dir.path().join("certs/fullchain.pem");
    out.fails_with(&[&cert.display().to_string()]);
    assert!(!out.stdout.contains(": ok"), "{out:#?}");
}

#[test]
fn check_config_names_a_missing_key_and_dkim_key() {
    let s = Setup::with_config(|dir| {
        base_config(
            dir,
            &format!(
                "[[dkim]]\ndomain = \"example.org\"\nselector = \"s1\"\nkey = \"{}/dkim/missing.pem\"\n",
                dir.display()
            ),
        )
    });
    let certs = s.dir.path().join("certs");
    s.run(&[
        "cert",
        "self-signed",
        "--hostname",
        HOSTNAME,
        "--out-dir",
        certs.to_str().unwrap(),
    ])
    .ok();
    std::fs::remove_file(certs.join("privkey.pem")).unwrap();
    let dkim = s.dir.path().join("dkim/missing.pem");
    s.run(&["check-config"]).fails_with(&[
        &certs.join("privkey.pem").display().to_string(),
        &dkim.display().to_string(),
    ]);
}

#[test]
fn cert_self_signed_writes_a_pair_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("new/certs");
    let config = dir.path().join("unused.toml");
    let args = [
        "cert",
        "self-signed",
        "--hostname",
        "mail.example.org",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    // Needs no configuration file.
    submitd(&config, &args, None).ok();
    let cert = out_dir.join("fullchain.pem");
    let key = out_dir.join("privkey.pem");
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(key_pem.contains("PRIVATE KEY-----"));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "private key mode {mode:o}");
    // The pair loads as a server configuration.
    submitd::tls::server_config(&cert, &key).expect("a usable pair");

    // A second run changes neither file.
    submitd(&config, &args, None).fails_with(&["exists"]);
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), cert_pem);
    assert_eq!(std::fs::read_to_string(&key).unwrap(), key_pem);

    // Nor does it when only one of the two is there.
    std::fs::remove_file(&key).unwrap();
    submitd(&config, &args, None).fails_with(&["exists"]);
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), cert_pem);
    assert!(!key.exists());
}
