//! The open-file limit of `till serve` / `till up`. Each proxied request
//! holds two descriptors (the agent's connection and the upstream's, which
//! then waits idle in the pool), so under an ordinary shell's soft limit of
//! 1024 one token holder could take them all long before `max_connections`:
//! every other agent then got 502 "Too many open files" after its use was
//! counted. As servers commonly do, the soft limit is raised to the hard one
//! at start, and a hard limit that still falls short is said at start.

use crate::proxy::Config;

/// Descriptors beside the connections: the listeners, the store and audit
/// files, the runtime's own, Redis and webhook connections, DNS lookups.
const RESERVE: u64 = 64;

/// Descriptors a proxy with `cfg`'s limits may hold at once.
pub fn needed(cfg: &Config) -> u64 {
    let admin = if cfg.admin_listen.is_some() {
        crate::proxy::server::ADMIN_CONNECTIONS as u64
    } else {
        // Admin connections then count in `max_connections`.
        0
    };
    2 * cfg.limits.max_connections as u64 + admin + RESERVE
}

/// The largest `max_connections` that `limit` descriptors serve.
fn fitting_max_connections(cfg: &Config, limit: u64) -> u64 {
    let fixed = needed(cfg) - 2 * cfg.limits.max_connections as u64;
    limit.saturating_sub(fixed) / 2
}

/// Raises the soft limit as far as it may go, logs what it did, and warns
/// when the limit is still below what `cfg` may need. Never fails the
/// start: a proxy under a low limit still serves, only fewer connections.
pub fn raise_and_check(cfg: &Config) {
    let need = needed(cfg);
    let Some((limit, hard)) = raise(need) else {
        return;
    };
    if limit.is_some_and(|l| l < need) {
        let limit = limit.unwrap_or_default();
        let hard = hard.map_or_else(|| "unlimited".to_string(), |h| h.to_string());
        let fits = fitting_max_connections(cfg, limit);
        let or_lower = if fits > 0 {
            format!(", or set limits.max_connections to at most {fits}")
        } else {
            String::new()
        };
        tracing::warn!(
            open_files = limit,
            hard_limit = %hard,
            needed = need,
            max_connections = cfg.limits.max_connections,
            "the open-file limit (RLIMIT_NOFILE) is {limit}, below the {need} that limits.max_connections = {} may need (2 per proxied request, plus admin connections and {RESERVE} for listeners, files and the store): past it agents' requests fail with 502 \"Too many open files\" after their use is counted. Raise the hard limit (`ulimit -n {need}` in the shell that starts till, which may need root; `LimitNOFILE={need}` in a systemd unit; `docker run --ulimit nofile={need}`){or_lower}",
            cfg.limits.max_connections,
        );
    }
}

/// Raises the soft limit to the hard one (or to `need` where the hard limit
/// is unlimited, which no system takes as a soft limit on open files).
/// Returns the soft and hard limits now in force (`None`: unlimited).
#[cfg(unix)]
fn raise(need: u64) -> Option<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let Some(soft) = now.current else {
        return Some((None, now.maximum));
    };
    let target = now.maximum.unwrap_or(need.max(soft));
    if target <= soft {
        return Some((Some(soft), now.maximum));
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: now.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = target,
                "raised the open-file limit (RLIMIT_NOFILE) to the hard limit"
            );
            Some((Some(target), now.maximum))
        }
        Err(e) => {
            tracing::warn!(
                from = soft,
                to = target,
                error = %e,
                "cannot raise the open-file limit (RLIMIT_NOFILE)"
            );
            Some((Some(soft), now.maximum))
        }
    }
}

/// No such limit to raise or read here.
#[cfg(not(unix))]
fn raise(_need: u64) -> Option<(Option<u64>, Option<u64>)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(&format!("listen = \"127.0.0.1:0\"\n{extra}"), "till.toml").unwrap()
    }

    #[test]
    fn two_descriptors_a_connection_plus_the_admin_plane_and_a_reserve() {
        let c = config("");
        assert_eq!(needed(&c), 2 * 4096 + RESERVE);
        let c = config("admin_listen = \"127.0.0.1:0\"\n[limits]\nmax_connections = 100");
        assert_eq!(needed(&c), 200 + 64 + RESERVE);
        // What fits in a limit needs no more than it.
        for limit in [0, 64, 1024, 4096, 100_000] {
            let fits = fitting_max_connections(&c, limit);
            let mut smaller = c.clone();
            smaller.limits.max_connections = fits as usize;
            assert!(fits == 0 || needed(&smaller) <= limit, "{limit}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_soft_limit_is_never_lowered() {
        use rustix::process::{Resource, getrlimit};
        let before = getrlimit(Resource::Nofile).current;
        let (after, _) = raise(1).unwrap();
        match (before, after) {
            (Some(b), Some(a)) => assert!(a >= b),
            (b, a) => assert_eq!(b, a),
        }
    }
}
