//! The deployment examples (`examples/deploy/`): the systemd unit and the
//! Dockerfile run `till` the way the README says, with flags the real CLI
//! accepts. No container runtime and no systemd manager are needed: the unit
//! is checked with `systemd-analyze`, and each command the unit or the image
//! would run is run here, with its paths moved into a temporary directory and
//! its port made ephemeral.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::helpers::*;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/deploy");
const README: &str = include_str!("../../README.md");
/// Where the unit and the image install the binary.
const INSTALLED: &str = "/usr/local/bin/till";
const SYSTEMD_ANALYZE: &str = "/usr/bin/systemd-analyze";

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(DEPLOY).join(name))
        .unwrap_or_else(|e| panic!("{DEPLOY}/{name}: {e}"))
}

/// Values of `key=` in a unit file, in order (comments skipped).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

fn unit_value(unit: &str, key: &str) -> String {
    let v = unit_values(unit, key);
    assert_eq!(v.len(), 1, "{key}= in till.service: {v:?}");
    v[0].clone()
}

/// `Environment=K=V` lines of the unit.
fn unit_env(unit: &str) -> Vec<(String, String)> {
    unit_values(unit, "Environment")
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("Environment=K=V");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Seconds of a systemd time span such as `45`, `45s` or `1min 30s`.
fn seconds(span: &str) -> u64 {
    span.split_whitespace()
        .map(|p| {
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits
                .parse()
                .unwrap_or_else(|_| panic!("time span {span}"));
            match &p[digits.len()..] {
                "" | "s" | "sec" => n,
                "min" | "m" => n * 60,
                u => panic!("unit {u} in {span}"),
            }
        })
        .sum()
}

/// `systemd-analyze`, or `None` (said loudly) when it is missing outside CI.
fn systemd_analyze() -> Option<&'static str> {
    if Path::new(SYSTEMD_ANALYZE).exists() {
        return Some(SYSTEMD_ANALYZE);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{SYSTEMD_ANALYZE} is missing: CI must install Debian's systemd package"
    );
    eprintln!(
        "\n**********************************************************************\n\
         SKIPPED: checking examples/deploy/till.service needs {SYSTEMD_ANALYZE}\n\
         (apt-get install -y systemd)\n\
         **********************************************************************\n"
    );
    None
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify_and_is_hardened() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let unit = read("till.service");
    // `verify` checks that the binary exists: point it at the one just
    // built; everything else is the file as shipped.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("till.service");
    std::fs::write(&path, unit.replace(INSTALLED, BIN)).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown keys and bad values are only warnings (exit 0), naming the
    // file: there must be none.
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("till.service"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");

    // An exposure level of at most 2.0 (of 10) by systemd's own measure:
    // a hardening line dropped or mistyped shows here.
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exposure above 2.0:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the README promises of it.
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "till"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        // At least 2 × max_connections (4096) + 64: README, "Run as a service".
        ("LimitNOFILE", "16384"),
    ] {
        assert_eq!(unit_value(&unit, key), want, "{key}=");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_unit_commands_start_till_with_its_credential_and_stop_in_time() {
    let unit = read("till.service");
    let config = read("till.toml");
    let up = Upstream::start().await;

    // The unit's directories, moved into a temporary one.
    let home = Home::empty();
    let state = home.path().join("state");
    let creds = home.path().join("credentials");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&creds).unwrap();
    let moved = |s: &str| {
        s.replace(INSTALLED, BIN)
            .replace("/var/lib/till", state.to_str().unwrap())
            .replace("/run/credentials/till.service", creds.to_str().unwrap())
            .replace(
                "/etc/till/till.toml",
                home.path().join("till.toml").to_str().unwrap(),
            )
    };

    // The config and the unit agree on the state directory, so `till issue`
    // with the unit's TILL_HOME finds the root key.
    let env = unit_env(&unit);
    let till_home = env
        .iter()
        .find(|(k, _)| k == "TILL_HOME")
        .map(|(_, v)| v.clone())
        .expect("Environment=TILL_HOME");
    assert_eq!(
        till_home,
        format!("/var/lib/{}", unit_value(&unit, "StateDirectory"))
    );
    let cfg: toml::Value = toml::from_str(&config).unwrap();
    assert_eq!(cfg["state_dir"].as_str(), Some(till_home.as_str()));

    // Every LoadCredential= the config reads, with the key systemd would copy.
    for lc in unit_values(&unit, "LoadCredential") {
        let (name, source) = lc.split_once(':').expect("LoadCredential=NAME:PATH");
        assert!(source.starts_with("/etc/till/"), "{source}");
        assert!(
            config.contains(&format!("/run/credentials/till.service/{name}")),
            "till.toml does not read the credential {name}"
        );
        std::fs::write(creds.join(name), format!("{OPENAI_SECRET}\n")).unwrap();
    }
    std::fs::write(
        home.path().join("till.toml"),
        moved(&config).replace("https://api.openai.com", &up.url()),
    )
    .unwrap();

    // ExecStartPre creates the root key once and then leaves it alone.
    let pre = unit_value(&unit, "ExecStartPre");
    let run_pre = || {
        let mut words = shell_words(&moved(&pre));
        let program = words.remove(0);
        let out = Command::new(program)
            .args(words)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("STATE_DIRECTORY", &state)
            .envs(env.iter().map(|(k, v)| (k.clone(), moved(v))))
            .output()
            .unwrap();
        assert!(out.status.success(), "ExecStartPre: {out:?}");
        std::fs::read(state.join("root.key")).expect("ExecStartPre made no root key")
    };
    let key = run_pre();
    assert_eq!(run_pre(), key, "the second start replaced the root key");

    // ExecStart, as written (only the port is ephemeral, through
    // TILL_LISTEN, which leaves the command line alone).
    let start = shell_words(&moved(&unit_value(&unit, "ExecStart")));
    assert_eq!(start[0], BIN);
    let args: Vec<&str> = start[1..].iter().map(String::as_str).collect();
    let mut envs: Vec<(String, String)> = env.iter().map(|(k, v)| (k.clone(), moved(v))).collect();
    envs.push(("TILL_LISTEN".into(), "127.0.0.1:0".into()));
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut proxy = Proxy::spawn_env(&home, &args, &home.path().join("till.toml"), &envs)
        .expect("the unit's ExecStart starts till");
    let health = client().get(proxy.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // A token from the state directory's root key works, and the upstream
    // gets the key from the credential file.
    let token = till([
        "issue",
        "--service",
        "openai",
        "--max-uses",
        "5",
        "--ttl",
        "1h",
    ])
    .env("TILL_HOME", state.to_str().unwrap())
    .run();
    token.success();
    assert_eq!(chat(&proxy, &token.out(), "gpt-4o-mini").await.0, 200);
    assert_eq!(
        up.seen()[0].headers["authorization"],
        format!("Bearer {OPENAI_SECRET}")
    );
    // `till serve` wrote the admin token next to the key, for `till usage`.
    assert!(state.join("admin.token").exists());

    // systemd waits TimeoutStopSec after SIGTERM before SIGKILL: longer than
    // the grace Till gives in-flight requests.
    let grace = cfg["limits"]["shutdown_grace_secs"]
        .as_integer()
        .unwrap_or(30) as u64;
    let timeout = seconds(&unit_value(&unit, "TimeoutStopSec"));
    assert!(
        timeout > grace,
        "TimeoutStopSec={timeout} <= shutdown_grace_secs={grace}"
    );
    assert_eq!(proxy.terminate(), 0, "SIGTERM is a clean stop");
}

/// Splits a command line the way systemd and sh do for the simple forms the
/// examples use: words, and single-quoted strings.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quote in {line}");
    if in_word {
        words.push(cur);
    }
    words
}

/// Arguments of a JSON-array (exec form) Dockerfile instruction.
fn exec_form(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile"));
    let v: Value = serde_json::from_str(&line[instruction.len()..])
        .unwrap_or_else(|e| panic!("{instruction} is not in exec form ({e}): {line}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The one README line starting with `prefix` (inside a code block).
fn readme_line(prefix: &str) -> String {
    let lines: Vec<&str> = README
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "README lines starting {prefix:?}: {lines:?}"
    );
    // Continuation lines (`\` at the end) belong to the command.
    let start = README.find(lines[0]).unwrap();
    let mut cmd = String::new();
    for l in README[start..].lines() {
        let l = l.trim();
        match l.strip_suffix('\\') {
            Some(rest) => cmd.push_str(rest),
            None => {
                cmd.push_str(l);
                break;
            }
        }
        cmd.push(' ');
    }
    cmd
}

/// The value after `flag` in a command line's words.
fn flag_value(words: &[String], flag: &str) -> String {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .unwrap_or_else(|| panic!("no {flag} in {words:?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn dockerfile_matches_the_readme_and_its_command_starts_till() {
    let dockerfile = read("Dockerfile");

    // The README's build line names this Dockerfile, built from the root.
    let build = shell_words(&readme_line("docker build"));
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(flag_value(&build, "-f"));
    assert_eq!(file, Path::new(DEPLOY).join("Dockerfile"));
    assert_eq!(build.last().map(String::as_str), Some("."), "{build:?}");
    let tag = flag_value(&build, "-t");

    // Built as the README's "Install" says, copied where ENTRYPOINT runs it.
    assert!(
        dockerfile.contains("RUN cargo build --release --locked"),
        "{dockerfile}"
    );
    let copy = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY --from="))
        .expect("a multi-stage COPY");
    assert!(
        copy.ends_with(&format!("target/release/till {INSTALLED}")),
        "{copy}"
    );
    assert_eq!(exec_form(&dockerfile, "ENTRYPOINT"), [INSTALLED]);
    // Not root.
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );

    // The state directory is TILL_HOME and a volume, and the README's run
    // line mounts it, publishes the exposed port and waits longer than the
    // shutdown grace before SIGKILL.
    let till_home = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENV TILL_HOME="))
        .expect("ENV TILL_HOME=");
    assert_eq!(exec_form(&dockerfile, "VOLUME"), [till_home]);
    let cmd = exec_form(&dockerfile, "CMD");
    let listen = flag_value(&cmd, "--listen");
    let port = listen.rsplit(':').next().unwrap();
    assert!(
        dockerfile.contains(&format!("\nEXPOSE {port}\n")),
        "EXPOSE {port}"
    );
    assert!(
        dockerfile.contains(&format!("http://127.0.0.1:{port}/healthz")),
        "HEALTHCHECK on /healthz"
    );
    let run = shell_words(&readme_line("docker run"));
    assert_eq!(run.last(), Some(&tag), "{run:?}");
    assert!(
        flag_value(&run, "-v").ends_with(&format!(":{till_home}")),
        "{run:?}"
    );
    assert!(
        flag_value(&run, "-p").ends_with(&format!(":{port}")),
        "{run:?}"
    );
    assert!(
        seconds(&flag_value(&run, "--stop-timeout")) > 30,
        "--stop-timeout must exceed shutdown_grace_secs (30)"
    );

    // The CMD's listen address is one the real CLI parser takes ...
    let addr = till::proxy::config::parse_listen(&listen).unwrap();
    assert!(addr.ip().is_unspecified(), "{addr}");
    // ... and the CMD starts till (on an ephemeral port here), with a fresh
    // TILL_HOME as on the volume's first start, the key from the environment
    // as `docker run -e OPENAI_API_KEY` passes it.
    let up = Upstream::start().await;
    let home = Home::empty();
    let ephemeral = format!("{}:0", addr.ip());
    let args: Vec<&str> = cmd
        .iter()
        .map(|a| {
            if *a == listen {
                ephemeral.as_str()
            } else {
                a.as_str()
            }
        })
        .collect();
    let proxy = Proxy::spawn_env(
        &home,
        &args,
        &home.path().join("till.toml"),
        &[
            ("OPENAI_API_KEY", OPENAI_SECRET),
            ("OPENAI_BASE_URL", &up.url()),
        ],
    )
    .expect("the image's CMD starts till");
    let health = client().get(proxy.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // The README's `docker exec till till issue ...` works against it.
    let issue = shell_words(&readme_line("docker exec till till issue"));
    assert_eq!(issue[..4], ["docker", "exec", "till", "till"]);
    let issue: Vec<&str> = issue[4..]
        .iter()
        .map(String::as_str)
        .take_while(|w| *w != ">")
        .collect();
    let token = till(&issue).home(&home).run();
    token.success();
    assert_eq!(chat(&proxy, &token.out(), "gpt-4o-mini").await.0, 200);

    // What a client outside the container is: not loopback (Docker's bridge
    // here, this machine's own non-loopback address in the test). It gets
    // the proxy, but the admin plane refuses it, as README, "Container", says.
    let Some(outside) = non_loopback_address() else {
        eprintln!("SKIPPED the non-loopback part: this machine has no non-loopback IPv4 address");
        return;
    };
    let base = format!("http://{outside}:{}", proxy.addr.port());
    let r = client()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .post(format!("{base}/openai/v1/chat/completions"))
        .bearer_auth(token.out())
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let admin = std::fs::read_to_string(home.path().join("admin.token")).unwrap();
    for (method, path) in [
        ("GET", "/admin/usage"),
        ("GET", "/metrics"),
        ("GET", "/dashboard"),
    ] {
        let r = client()
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(admin.trim())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path} from {outside}");
    }
    let r = client()
        .post(format!("{base}/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", admin.trim()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "dashboard login from {outside}");
    assert!(r.headers().get("set-cookie").is_none());
}

/// This machine's address on its default route, if it has one: the source
/// address a UDP socket "connected" to a documentation address would use (no
/// packet is sent).
fn non_loopback_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("198.51.100.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}
