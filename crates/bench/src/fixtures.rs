//! The fake BACE's accounts and the broker configs: account `acct-N` is user
//! `acct-N@example.com` with password `pw-acct-N`, client `cid`/`csecret`, on both sides.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::Context;
use fake_bace::{FakeAccount, FakeBace, FakeOptions};
use testkit::{Account, BrokerConfig};

use crate::opts::Opts;

pub(crate) fn account_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("acct-{i}")).collect()
}

pub(crate) fn user(account: &str) -> String {
    format!("{account}@example.com")
}

/// The fake BACE's side of `account`.
pub(crate) fn fake_account(account: &str) -> FakeAccount {
    FakeAccount::new(user(account), format!("pw-{account}"), "cid", "csecret")
}

/// The broker's side of `account`.
fn broker_account(account: &str) -> Account {
    Account::new(
        account,
        "cid",
        "csecret",
        user(account),
        format!("pw-{account}"),
    )
}

pub(crate) async fn start_fake(names: &[String]) -> anyhow::Result<FakeBace> {
    let fake = FakeBace::start(FakeOptions::default()).await?;
    for n in names {
        fake.add_account(fake_account(n));
    }
    Ok(fake)
}

/// A broker config for `names` against `fake` (upstream timeout 60 s); sections add their own
/// keys.
pub(crate) fn broker_config(fake: &FakeBace, names: &[String]) -> BrokerConfig {
    names.iter().fold(
        BrokerConfig::new()
            .token_url(fake.token_url())
            .upstream_timeout(Duration::from_secs(60)),
        |config, n| config.account(broker_account(n)),
    )
}

/// Writes `config` as `<work>/config/<name>.yaml` and returns its path.
pub(crate) fn write_config(
    opts: &Opts,
    name: &str,
    config: &BrokerConfig,
) -> anyhow::Result<PathBuf> {
    // A directory of its own: the broker watches its config's directory for changes (live
    // reload), and the h2load logs written next to it would wake it all the time.
    let dir = opts.work.join("config");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.yaml"));
    fs::write(&path, config.to_yaml()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The store section of a broker on `redis`, with a fresh key file in the work directory.
pub(crate) fn store_config(
    opts: &Opts,
    redis: &testkit::RedisServer,
) -> anyhow::Result<testkit::RedisStore> {
    let dir = opts.work.join("store");
    fs::create_dir_all(&dir)?;
    let keys = dir.join("keys");
    testkit::RedisStore::write_key_file(&keys, &["bench"]);
    Ok(testkit::RedisStore::new(redis.url(), keys)
        .timeout(Duration::from_secs(2))
        .lease(Duration::from_secs(10)))
}
