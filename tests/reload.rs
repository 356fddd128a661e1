//! Live reload over the wire: accounts added, removed and re-credentialed through the config
//! file and Kubernetes-style secret volumes (a `..data` symlink swap), invalid configs
//! rejected whole. Waits on the reload counter and the fake's call counters, never on sleeps.

use std::{path::Path, time::Duration};

use bace_token_broker::{Config, READINESS_SERVICE};
use fake_bace::Grant;
use testkit::{Account, BrokerConfig, BrokerServer, fake, fake_account, get_min, guard, user};
use tonic::Code;

/// A config directory with a Kubernetes-style secret volume per account.
struct Files {
    dir: tempfile::TempDir,
    token_url: String,
    version: u32,
}

impl Files {
    fn new(token_url: String) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            token_url,
            version: 0,
        }
    }

    fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// Writes `account`'s password into its secret volume by swapping the `..data` symlink,
    /// as the kubelet does.
    fn write_secret(&mut self, account: &str, password: &str) {
        self.version += 1;
        let volume = self.dir.path().join("secrets").join(account);
        let data = volume.join(format!("..v{}", self.version));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("password"), format!("{password}\n")).unwrap();
        let tmp = volume.join("..data_tmp");
        std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, volume.join("..data")).unwrap();
        let link = volume.join("password");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("..data/password", &link).unwrap();
        }
    }

    /// A config for `accounts`, each reading its password from its secret volume.
    fn config(&self, accounts: &[&str]) -> BrokerConfig {
        accounts.iter().fold(BrokerConfig::new(), |config, a| {
            let password_file = self.dir.path().join("secrets").join(a).join("password");
            config.account(
                Account::standard(a)
                    .password_file(password_file)
                    .token_url(self.token_url.clone()),
            )
        })
    }

    /// Writes the config (atomically, by rename).
    fn write_config(&self, config: &BrokerConfig) {
        self.write_yaml(&config.to_yaml());
    }

    /// Writes `yaml` as the config (atomically, by rename).
    fn write_yaml(&self, yaml: &str) {
        write_atomically(&self.config_path(), yaml);
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits until `bace_broker_config_reloads_total{outcome}` reaches `n`.
async fn reloads(broker: &BrokerServer, outcome: &str, n: f64) {
    let key = format!("bace_broker_config_reloads_total{{outcome=\"{outcome}\"}}");
    guard(async {
        while broker.scrape().await.get(&key).copied().unwrap_or(0.0) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn accounts_are_added_changed_and_removed_without_touching_the_others() {
    let fake = fake(&["fleet-a", "fleet-b", "fleet-c"]).await;
    let mut files = Files::new(fake.token_url());
    for a in ["fleet-a", "fleet-b", "fleet-c"] {
        files.write_secret(a, &format!("pw-{a}-Zq9"));
    }
    files.write_config(&files.config(&["fleet-a", "fleet-b"]));
    let broker = BrokerServer::start_config(Config::load(&files.config_path()).unwrap()).await;
    broker
        .wait_status(
            READINESS_SERVICE,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
        )
        .await;
    let a = broker.get("fleet-a").await.unwrap();
    let b = broker.get("fleet-b").await.unwrap();
    assert_eq!(
        broker.get("fleet-c").await.unwrap_err().code(),
        Code::NotFound
    );

    // Add fleet-c, remove fleet-b.
    files.write_config(&files.config(&["fleet-a", "fleet-c"]));
    reloads(&broker, "ok", 1.0).await;
    let c = guard(broker.get("fleet-c")).await.unwrap();
    assert!(fake.is_valid(&c.access_token));
    assert_eq!(
        broker.get("fleet-b").await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(
        fake.is_valid(&b.access_token),
        "a removed account's token is just dropped"
    );

    // Rotate fleet-c's password at BACE and in its secret volume: fleet-c logs in again.
    fake.set_password(&user("fleet-c"), "rotated-pw");
    files.write_secret("fleet-c", "rotated-pw");
    reloads(&broker, "ok", 2.0).await;
    guard(fake.wait_for_calls(&user("fleet-c"), Grant::Password, 2)).await;
    let c2 = guard(async {
        loop {
            let t = broker.get("fleet-c").await.unwrap();
            if t.access_token != c.access_token {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(fake.is_valid(&c2.access_token));
    let last = fake
        .last_request(&user("fleet-c"), Grant::Password)
        .unwrap();
    assert_eq!(last.form["password"], "rotated-pw");

    // fleet-a was never touched: same token, one login, no refresh.
    assert_eq!(
        broker.get("fleet-a").await.unwrap().access_token,
        a.access_token
    );
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 1);
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Refresh), 0);
    assert_eq!(fake.calls(&user("fleet-b"), Grant::Password), 1);
    // fleet-c's counters survived the new slot its new password made: both logins counted.
    let m = broker.scrape().await;
    assert_eq!(
        m["bace_broker_upstream_requests_total{account=\"fleet-c\",grant=\"password\",outcome=\"ok\"}"],
        2.0
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn an_invalid_config_is_rejected_whole_and_the_old_one_keeps_serving() {
    let fake = fake(&["fleet-a", "fleet-b"]).await;
    let mut files = Files::new(fake.token_url());
    files.write_secret("fleet-a", "pw-fleet-a-Zq9");
    files.write_secret("fleet-b", "pw-fleet-b-Zq9");
    files.write_config(&files.config(&["fleet-a"]));
    let broker = BrokerServer::start_config(Config::load(&files.config_path()).unwrap()).await;
    let a = guard(broker.get("fleet-a")).await.unwrap();

    // fleet-b would be valid, but the config as a whole is not (unknown key): nothing applies.
    let valid = files.config(&["fleet-a", "fleet-b"]).to_yaml();
    files.write_yaml(&format!("refresh:\n  lifetime_fration: 0.5\n{valid}"));
    reloads(&broker, "rejected", 1.0).await;
    assert_eq!(
        broker.get("fleet-b").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        broker.get("fleet-a").await.unwrap().access_token,
        a.access_token
    );
    // A secret file that cannot be read rejects the reload too.
    files.write_config(&files.config(&["fleet-a", "fleet-b", "fleet-x"]));
    reloads(&broker, "rejected", 2.0).await;
    assert_eq!(
        broker.get("fleet-b").await.unwrap_err().code(),
        Code::NotFound
    );

    // Fixed: applied.
    files.write_config(&files.config(&["fleet-a", "fleet-b"]));
    reloads(&broker, "ok", 1.0).await;
    assert!(guard(broker.get("fleet-b")).await.is_ok());
    assert_eq!(fake.calls(&user("fleet-a"), Grant::Password), 1);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_removed_account_stops_refreshing() {
    let fake = fake(&[]).await;
    for a in ["keep", "drop"] {
        let mut account = fake_account(a);
        account.login_lifetime = Duration::from_secs(3);
        account.refresh_lifetime = Duration::from_secs(3);
        fake.add_account(account);
    }
    let mut files = Files::new(fake.token_url());
    files.write_secret("keep", "pw-keep-Zq9");
    files.write_secret("drop", "pw-drop-Zq9");
    let short_refresh = |config: BrokerConfig| {
        config
            .lifetime_fraction(0.3)
            .expiry_margin(Duration::from_secs(1))
    };
    files.write_config(&short_refresh(files.config(&["keep", "drop"])));
    let broker = BrokerServer::start_config(Config::load(&files.config_path()).unwrap()).await;
    guard(fake.wait_for_calls(&user("drop"), Grant::Refresh, 1)).await;
    files.write_config(&short_refresh(files.config(&["keep"])));
    reloads(&broker, "ok", 1.0).await;
    let dropped_at = fake.calls(&user("drop"), Grant::Refresh);
    // "keep" refreshes three more times (about a second each); "drop" never again (at most a
    // refresh already in flight when the reload landed).
    let kept = fake.calls(&user("keep"), Grant::Refresh);
    guard(fake.wait_for_calls(&user("keep"), Grant::Refresh, kept + 3)).await;
    assert!(fake.calls(&user("drop"), Grant::Refresh) <= dropped_at + 1);
    broker.stop().await.unwrap();
}

/// A reload reads the config and secret files, and reading is an inotify event too: a
/// watcher that took every event for a change reloaded again after each reload, forever.
/// (This asserts an absence, so it waits: for five debounce periods after the reload.)
#[tokio::test]
async fn a_reload_does_not_trigger_the_next_one() {
    let fake = fake(&["fleet-a"]).await;
    let mut files = Files::new(fake.token_url());
    files.write_secret("fleet-a", "pw-fleet-a-Zq9");
    files.write_config(&files.config(&["fleet-a"]));
    let broker = BrokerServer::start_config(Config::load(&files.config_path()).unwrap()).await;
    broker
        .wait_status(
            READINESS_SERVICE,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
        )
        .await;
    files.write_config(&files.config(&["fleet-a"]));
    reloads(&broker, "unchanged", 1.0).await;
    tokio::time::sleep(bace_token_broker::DEBOUNCE * 5).await;
    let key = "bace_broker_config_reloads_total{outcome=\"unchanged\"}";
    assert_eq!(broker.scrape().await[key], 1.0, "reloaded again by itself");
}

/// A removed account's series leave `/metrics` (its failed upstream requests, GetToken failures
/// and Invalidate outcomes), so account names that come and go do not pile up in memory; the
/// other accounts' series stay.
#[tokio::test]
async fn a_removed_accounts_series_leave_the_metrics() {
    let fake = fake(&["fleet-a", "fleet-b"]).await;
    let mut files = Files::new(fake.token_url());
    for a in ["fleet-a", "fleet-b"] {
        files.write_secret(a, &format!("pw-{a}-Zq9"));
    }
    files.write_config(&files.config(&["fleet-a", "fleet-b"]));
    let broker = BrokerServer::start_config(Config::load(&files.config_path()).unwrap()).await;
    let mut client = broker.new_client().await;
    for account in ["fleet-a", "fleet-b"] {
        let token = guard(broker.get(account)).await.unwrap();
        // A GetToken failure (no token lives a year) and an Invalidate whose login BACE
        // rejects: a failed upstream request.
        let too_long = get_min(
            &mut client,
            account,
            Some(Duration::from_secs(365 * 86_400)),
        );
        assert_eq!(too_long.await.unwrap_err().code(), Code::OutOfRange);
        fake.set_password(&user(account), "changed-at-bace");
        let _ = broker.invalidate(account, &token.access_token).await;
    }
    let series_of = |m: &std::collections::HashMap<String, f64>, account: &str| {
        let label = format!("account=\"{account}\"");
        let mut names: Vec<String> = m
            .keys()
            .filter(|k| k.contains(&label))
            .map(|k| k.split('{').next().unwrap().to_owned())
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let before = series_of(&broker.scrape().await, "fleet-b");
    for family in [
        "bace_broker_get_token_total",
        "bace_broker_invalidate_total",
        "bace_broker_upstream_requests_total",
    ] {
        assert!(before.iter().any(|n| n == family), "{family} in {before:?}");
    }

    files.write_config(&files.config(&["fleet-a"]));
    reloads(&broker, "ok", 1.0).await;
    let m = broker.scrape().await;
    assert_eq!(series_of(&m, "fleet-b"), Vec::<String>::new());
    assert_eq!(series_of(&m, "fleet-a"), before, "fleet-a's series stay");
    broker.stop().await.unwrap();
}
