//! Who may write the state directory (red team, wave 2, third pass): Till
//! makes it private whatever the umask, never writes through a file someone
//! planted in it, refuses one (or a till.toml) another user could have
//! written, and keeps working when root manages the state directory of a
//! service running as its own user (systemd's `DynamicUser`).
//!
//! Tests that need a second user run as root (CI does) and run the proxy as
//! `nobody` with `setpriv`; elsewhere they say they are skipped.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::helpers::*;

/// `nobody`, the service's user in these tests.
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// True (after saying so) when the test cannot run: it needs root to act
/// as two users.
fn skipped_without_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("skipped {test}: it needs root, to run the proxy as another user with setpriv");
    true
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// `chown -R uid:gid path` (no symlinks followed).
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if std::fs::symlink_metadata(path).unwrap().is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid);
        }
    }
}

/// Every path under `dir`, `dir` included.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if std::fs::symlink_metadata(dir).unwrap().is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

/// Waits (at most a minute, then fails) until `path` exists.
async fn wait_for_file(path: &Path) {
    for _ in 0..6000 {
        if std::fs::symlink_metadata(path).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

async fn status(proxy: &Proxy, token: &str) -> u16 {
    chat(proxy, token, "gpt-4o-mini").await.0
}

/// A service as the example systemd unit runs it: the state directory
/// belongs to the service's user (here `nobody`) and sits in a directory
/// only root can write to (as `/var/lib/private`); the config belongs to
/// root. The binary is copied next to them, so `nobody` can run it
/// wherever the checkout is.
struct Service {
    home: Home,
    bin: PathBuf,
    config: PathBuf,
}

impl Service {
    fn new(up: &Upstream) -> Service {
        let home = Home::inside("state");
        chmod(home.outer(), 0o755);
        std::fs::create_dir(home.path()).unwrap();
        till::token::keys::save(
            &home.path().join(till::token::keys::ROOT_KEY_FILE),
            &till::token::keys::generate(),
            false,
        )
        .unwrap();
        chown_tree(home.path(), NOBODY);
        chmod(home.path(), 0o700);
        let bin = home.outer().join("till");
        std::fs::copy(BIN, &bin).unwrap();
        chmod(&bin, 0o755);
        let config = home.outer().join("till.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n[upstreams.openai]\nurl = {:?}\ncredential = \"none\"\n",
                home.path().to_str().unwrap(),
                up.url()
            ),
        )
        .unwrap();
        Service { home, bin, config }
    }

    /// `setpriv ... till serve --config FILE` as `nobody`.
    fn argv(&self) -> Vec<String> {
        vec![
            "setpriv".into(),
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            self.bin.to_str().unwrap().into(),
            "serve".into(),
            "--config".into(),
            self.config.to_str().unwrap().into(),
        ]
    }

    fn start(&self) -> Result<Proxy, String> {
        let argv = self.argv();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        Proxy::spawn_argv(
            &self.home,
            &argv,
            self.home.outer(),
            self.home.outer(),
            &self.config,
        )
    }

    /// A root CLI command on the service's state directory, against `proxy`.
    fn root_cli(&self, args: &[&str], proxy: &Proxy) -> Out {
        till(args)
            .home(&self.home)
            .env("TILL_URL", &proxy.url(""))
            .run()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_root_rotating_and_retiring_a_service_users_keys_takes_effect_or_fails_loudly() {
    if skipped_without_root("regression_root_rotating_and_retiring_a_service_users_keys") {
        return;
    }
    let up = Upstream::start().await;
    let svc = Service::new(&up);
    let mut proxy = svc.start().expect("the service starts");
    let issue = || {
        svc.root_cli(&["issue", "--service", "openai", "--ttl", "1h"], &proxy)
            .success()
            .out()
    };
    let old = issue();
    assert_eq!(status(&proxy, &old).await, 200);

    // The README's rotation, run as root on the service's directory.
    svc.root_cli(&["keygen", "--rotate"], &proxy).success();
    svc.root_cli(&["reload"], &proxy).success();
    let new = issue();
    svc.root_cli(&["key", "retire", "0"], &proxy).success();
    svc.root_cli(&["reload"], &proxy).success();
    assert_eq!(
        status(&proxy, &old).await,
        401,
        "a retired key's token must be refused once `till reload` said so"
    );
    assert_eq!(status(&proxy, &new).await, 200);
    // What root wrote there belongs to the service, which can read it.
    for p in walk(svc.home.path()) {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            m.uid(),
            NOBODY,
            "{} belongs to uid {}",
            p.display(),
            m.uid()
        );
    }

    // keys/ as an older till left it, root's and closed to the service: a
    // reload is refused, naming the path and the fix, and the set in use
    // stays (key 0 retired).
    let keys = svc.home.path().join("keys");
    chown_tree(&keys, 0);
    let refused = svc.root_cli(&["reload"], &proxy);
    refused
        .code(2)
        .stderr_has("keys/index.json")
        .stderr_has("Permission denied")
        .stderr_has("chown -R");
    assert_eq!(
        status(&proxy, &old).await,
        401,
        "the previous key set stays"
    );
    assert_eq!(status(&proxy, &new).await, 200);
    assert!(proxy.logs().contains("reload refused"), "{}", proxy.logs());

    // A start refuses too (exit 2), saying the same, instead of serving
    // with root.key alone.
    assert_eq!(proxy.terminate(), 0);
    let argv = svc.argv();
    let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("keys/index.json") && err.contains("chown -R"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_under_umask_000_the_state_directory_and_its_files_are_private() {
    let up = Upstream::start().await;
    let home = Home::inside("home");
    let umask_000 = ["sh", "-c", "umask 000; exec \"$0\" \"$@\""];
    let upstream = format!("openai={}", up.url());
    let mut argv = umask_000.to_vec();
    argv.extend([
        BIN,
        "up",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
    ]);
    let config = home.path().join("till.toml");
    let mut proxy = Proxy::spawn_argv(&home, &argv, home.outer(), home.outer(), &config)
        .expect("till up starts");
    let token = till([
        "issue",
        "--service",
        "openai",
        "--max-uses",
        "5",
        "--rate",
        "5/1m",
        "--ttl",
        "1h",
        "--label",
        "umask",
    ])
    .home(&home)
    .run()
    .success()
    .out();
    assert_eq!(status(&proxy, &token).await, 200);
    let rotate = Command::new(umask_000[0])
        .args(&umask_000[1..])
        .args([BIN, "keygen", "--rotate"])
        .env("TILL_HOME", home.path())
        .output()
        .unwrap();
    assert!(rotate.status.success(), "{rotate:?}");
    wait_for_file(&home.path().join("clock")).await;
    // Stopping writes the rate windows and the exact counts.
    assert_eq!(proxy.terminate(), 0);

    let h = home.path();
    assert_eq!(mode(h), 0o700, "the state directory");
    assert_eq!(mode(&h.join("keys")), 0o700, "keys/");
    for f in [
        "till.toml",
        "root.key",
        "admin.token",
        "admin.token.previous",
        "state.redb",
        "audit.jsonl",
        "clock",
        "windows.json",
        "keys/1.key",
        "keys/index.json",
    ] {
        assert_eq!(mode(&h.join(f)), 0o600, "{f}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_planted_temporary_symlink_is_never_written_through() {
    let up = Upstream::start().await;
    let home = Home::new();
    // Files the proxy's user can write but that are not Till's: left
    // from when the directory was open to others, they point elsewhere.
    let victims = tempfile::tempdir().unwrap();
    let mut planted = Vec::new();
    for name in ["clock", "windows.json"] {
        let victim = victims.path().join(name);
        std::fs::write(&victim, "NOT TILL'S\n").unwrap();
        std::os::unix::fs::symlink(&victim, home.path().join(format!("{name}.tmp"))).unwrap();
        planted.push((name, victim));
    }
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let token = home.issue(till::token::Scope {
        services: vec!["openai".into()],
        rates: vec![till::token::vocab::Rate {
            limit: 5,
            seconds: 60,
        }],
        ..till::token::Scope::default()
    });
    assert_eq!(status(&proxy, &token).await, 200);
    wait_for_file(&home.path().join("clock")).await;
    assert_eq!(proxy.terminate(), 0);
    for (name, victim) in planted {
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "NOT TILL'S\n",
            "the proxy wrote {name} through the planted {name}.tmp"
        );
        let saved = home.path().join(name);
        assert!(
            std::fs::symlink_metadata(&saved).unwrap().is_file(),
            "{name} is a file of its own"
        );
        assert_eq!(mode(&saved), 0o600, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_state_directory_or_config_others_can_write_is_refused() {
    let up = Upstream::start().await;
    let home = Home::new();
    let mut proxy = Proxy::start(&home, &[openai(&up)], "");
    let config = proxy.config.clone();
    let token = home.token("openai", Some(10));
    assert_eq!(status(&proxy, &token).await, 200);

    // Another user appends an upstream to a till.toml left writable by
    // all: the reload refuses the file, and nothing of it is used.
    chmod(&config, 0o666);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[upstreams.loot]\nurl = \"http://127.0.0.1:9\"\ncredential = \"none\"\n");
    std::fs::write(&config, text).unwrap();
    sighup(&proxy);
    let logs = wait_for_log(&proxy, "reload refused", 1).await;
    assert!(
        logs.contains("writable by its group and every user (mode 0666)"),
        "{logs}"
    );
    let loot = client()
        .get(proxy.url("/loot/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    // Unknown to the proxy (404), not forwarded (502 from port 9).
    assert_eq!(
        loot.status().as_u16(),
        404,
        "the appended upstream is not used"
    );
    // The CLI refuses to read the proxy's address from such a file too.
    till(["reload"])
        .home(&home)
        .run()
        .code(2)
        .stderr_has("writable by its group and every user (mode 0666)")
        .stderr_has("chmod 600");
    assert_eq!(proxy.terminate(), 0);
    till(["serve", "--config", config.to_str().unwrap()])
        .run()
        .code(2)
        .stderr_has("chmod 600");
    chmod(&config, 0o600);

    // The state directory itself open to everyone: every command that
    // reads it, and a start, refuse it.
    chmod(home.path(), 0o777);
    for args in [
        vec!["usage"],
        vec!["issue", "--service", "openai", "--ttl", "1h"],
        vec!["key", "list"],
        vec!["keygen", "--rotate"],
        vec!["up", "--listen", "127.0.0.1:0"],
    ] {
        till(&args)
            .home(&home)
            .run()
            .code(2)
            .stderr_has("is writable by its group and every user (mode 0777)")
            .stderr_has("chmod 700");
    }
    till(["serve", "--config", config.to_str().unwrap()])
        .run()
        .code(2)
        .stderr_has("chmod 700");
    chmod(home.path(), 0o700);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_dot_till_planted_by_another_user_gets_no_admin_token() {
    if skipped_without_root("regression_a_dot_till_planted_by_another_user_gets_no_admin_token") {
        return;
    }
    // The planted till.toml's `listen` is this server: it records what
    // reaches it.
    let attacker = Upstream::start().await;
    let shared = tempfile::tempdir().unwrap();
    chmod(shared.path(), 0o1777);
    let planted = shared.path().join(".till");
    std::fs::create_dir(&planted).unwrap();
    std::fs::write(
        planted.join("till.toml"),
        format!("listen = \"{}\"\n", attacker.addr),
    )
    .unwrap();
    chown_tree(&planted, NOBODY);
    // The default TILL_HOME is `.till` in the working directory.
    till(["usage"])
        .dir(shared.path())
        .env("TILL_ADMIN_TOKEN", "operator-admin-token")
        .run()
        .code(2)
        .stderr_has(".till belongs to uid 65534")
        .stderr_has("is writable by others (mode 1777)");
    assert_eq!(attacker.count(), 0, "{:?}", attacker.seen());
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_empty_admin_token_left_by_a_crash_is_recreated_at_start() {
    let up = Upstream::start().await;
    let home = Home::new();
    // What a till killed while writing it on its first start left.
    home.write("admin.token", "");
    let proxy = Proxy::start(&home, &[openai(&up)], "");
    let admin = std::fs::read_to_string(home.path().join("admin.token")).unwrap();
    assert!(!admin.trim().is_empty(), "admin.token is still empty");
    assert_eq!(mode(&home.path().join("admin.token")), 0o600);
    assert!(proxy.logs().contains("re-created the empty admin token"));
    till(["usage", "--url", &proxy.url("")])
        .home(&home)
        .run()
        .success();
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_policy_directory_others_can_write_is_refused() {
    // The policies decide what every token may do, and the default
    // `policies` is relative to the working directory: `allow if true;`
    // planted there lets a token for one service reach every upstream.
    let up = Upstream::start().await;
    let home = Home::new();
    let policies = home.path().join("pol");
    std::fs::create_dir(&policies).unwrap();
    std::fs::copy(
        Path::new(policies_dir()).join("default.datalog"),
        policies.join("default.datalog"),
    )
    .unwrap();
    chmod(&policies.join("default.datalog"), 0o644);
    chmod(&policies, 0o755);
    let config = home.write(
        "till.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\npolicies = {:?}\n\
             [upstreams.openai]\nurl = {:?}\ncredential = \"none\"\n",
            home.path().to_str().unwrap(),
            policies.to_str().unwrap(),
            up.url()
        ),
    );
    chmod(&config, 0o600);
    let proxy = Proxy::start_config(&home, &config).expect("proxy starts");
    let other = home.token("github", Some(10));
    assert_eq!(status(&proxy, &other).await, 403, "not a token for openai");

    // Someone else opens the directory up and adds a policy.
    chmod(&policies, 0o777);
    let planted = policies.join("zz-open.datalog");
    std::fs::write(&planted, "allow if true;\n").unwrap();
    sighup(&proxy);
    let logs = wait_for_log(&proxy, "reload refused", 1).await;
    assert!(
        logs.contains("writable by its group and every user (mode 0777)")
            && logs.contains("decides what every token may do"),
        "{logs}"
    );
    assert_eq!(
        status(&proxy, &other).await,
        403,
        "the planted policy is not used"
    );
    assert_eq!(up.count(), 0, "{:?}", up.seen());
    // A file of its own others can write is refused the same way.
    chmod(&policies, 0o755);
    chmod(&planted, 0o666);
    let cmd = till(["reload"]).home(&home).env("TILL_URL", &proxy.url(""));
    tokio::task::spawn_blocking(move || cmd.run())
        .await
        .unwrap()
        .code(2)
        .stderr_has("zz-open.datalog is writable by its group and every user (mode 0666)")
        .stderr_has("chmod go-w");
    assert_eq!(status(&proxy, &other).await, 403);
    assert_eq!(up.count(), 0, "{:?}", up.seen());
    // `till verify` judges with the same policies, so it refuses them too.
    till([
        "verify",
        "--policies",
        policies.to_str().unwrap(),
        "--token",
        &other,
        "--service",
        "openai",
    ])
    .home(&home)
    .run()
    .code(2)
    .stderr_has("chmod go-w");
    drop(proxy);
    // And a start refuses them before listening.
    till(["serve", "--config", config.to_str().unwrap()])
        .run()
        .code(2)
        .stderr_has("zz-open.datalog is writable")
        .stderr_has("decides what every token may do");
}
