//! The soak's accounts: 1,000 active at a time, each with its own 5–20 s token lifetime, and a
//! reload plan that removes some and adds new ones every minute. Writes the fake's accounts
//! file and the broker's config (through [`testkit::BrokerConfig`]).

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde_json::json;
use testkit::{Account, BrokerConfig};

use crate::opts::Opts;

/// The OAuth2 client every soak account uses.
const CLIENT_ID: &str = "soak-client";
const CLIENT_SECRET: &str = "soak-client-secret";

/// The refresh policy the soak runs the broker with. Tokens live 5–20 s, so the expiry margin
/// must be well under 5 s (the default 10 s would leave nothing to serve).
pub(crate) struct Policy {
    pub(crate) expiry_margin: Duration,
    pub(crate) upstream_timeout: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) invalidate_cooldown: Duration,
}

pub(crate) const POLICY: Policy = Policy {
    expiry_margin: Duration::from_secs(3),
    upstream_timeout: Duration::from_secs(3),
    backoff_initial: Duration::from_secs(1),
    backoff_max: Duration::from_secs(10),
    invalidate_cooldown: Duration::from_secs(10),
};

/// One account of the soak.
#[derive(Clone, Debug)]
pub(crate) struct SoakAccount {
    pub(crate) name: String,
    /// Token lifetime at the fake, for a login and for a refresh alike (so the fake's expiry of
    /// a token moves later, but for rounding to the second, which lets the checker cache it).
    pub(crate) lifetime_secs: u64,
    /// `bace` (the same token extended) or `oauth2-rotate` (a new token per refresh).
    pub(crate) refresh_style: &'static str,
}

/// Every account the run will use, and which are active when.
pub(crate) struct Fleet {
    /// The accounts active at the start.
    pub(crate) initial: Vec<SoakAccount>,
    /// Per reload (one a minute): the accounts it adds.
    pub(crate) additions: Vec<Vec<SoakAccount>>,
    rng: StdRng,
}

impl Fleet {
    pub(crate) fn new(opts: &Opts) -> Self {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let account = |name: String, rng: &mut StdRng| SoakAccount {
            name,
            lifetime_secs: rng.random_range(5..=20),
            refresh_style: if rng.random_bool(1.0 / 3.0) {
                "oauth2-rotate"
            } else {
                "bace"
            },
        };
        let initial = (0..opts.accounts)
            .map(|i| account(format!("acct-{i:04}"), &mut rng))
            .collect();
        let additions = (1..=opts.reloads())
            .map(|r| {
                (0..opts.churn)
                    .map(|i| account(format!("added-{r:03}-{i:03}"), &mut rng))
                    .collect()
            })
            .collect();
        Self {
            initial,
            additions,
            rng,
        }
    }

    /// Which of `active` a reload removes: `n` picked at random.
    pub(crate) fn pick_removals(&mut self, active: &[SoakAccount], n: usize) -> Vec<String> {
        let mut names: Vec<String> = active.iter().map(|a| a.name.clone()).collect();
        names.shuffle(&mut self.rng);
        names.truncate(n);
        names
    }

    /// The fake's accounts file: every account the run will ever configure.
    pub(crate) fn write_fake_accounts(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let accounts: Vec<_> = self
            .initial
            .iter()
            .chain(self.additions.iter().flatten())
            .map(|a| {
                json!({
                    "username": username(&a.name),
                    "password": password(&a.name),
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                    "login_lifetime_secs": a.lifetime_secs,
                    "refresh_lifetime_secs": a.lifetime_secs,
                    "refresh_style": a.refresh_style,
                })
            })
            .collect();
        let file = dir.join("fake-accounts.json");
        fs::write(&file, json!({ "accounts": accounts }).to_string())?;
        Ok(file)
    }
}

/// The fake's username of account `name` (the fake counts calls by username).
pub(crate) fn username(name: &str) -> String {
    format!("{name}@soak.example.com")
}

fn password(name: &str) -> String {
    format!("pw-{name}")
}

/// Writes the broker's config for `active` to `file`, atomically (a temporary file renamed
/// over it), so the broker's file watcher never reads half a file.
pub(crate) fn write_broker_config(
    file: &Path,
    token_url: &str,
    listen: SocketAddr,
    metrics: SocketAddr,
    active: &[SoakAccount],
) -> anyhow::Result<()> {
    let config = active.iter().fold(
        BrokerConfig::new()
            .listen(listen)
            .metrics_listen(Some(metrics))
            .token_url(token_url)
            .upstream_timeout(POLICY.upstream_timeout)
            .expiry_margin(POLICY.expiry_margin)
            .backoff_initial(POLICY.backoff_initial)
            .backoff_max(POLICY.backoff_max)
            .invalidate_cooldown(POLICY.invalidate_cooldown)
            .warmup_concurrency(64),
        |config, a| {
            config.account(Account::new(
                &a.name,
                CLIENT_ID,
                CLIENT_SECRET,
                username(&a.name),
                password(&a.name),
            ))
        },
    );
    let tmp = file.with_extension("yaml.tmp");
    fs::write(&tmp, config.to_yaml())?;
    fs::rename(&tmp, file)?;
    Ok(())
}
