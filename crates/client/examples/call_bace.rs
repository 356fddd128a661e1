//! Calls a BACE API endpoint through `BrokerAuthMiddleware`: the token comes from the broker
//! (cached, refreshed by it), and a 401 is reported and retried once.
//!
//! ```sh
//! # a broker with its demo (a fake BACE on loopback; its URL is in the broker's log line
//! # "demo: fake BACE running; fake_bace=http://127.0.0.1:PORT/oauth2/token"):
//! cargo run -- serve --demo
//! cargo run -p bace-token-broker-client --example call_bace -- \
//!     demo-fleet-a http://127.0.0.1:PORT/api/v2/physical-device
//! ```
//!
//! The broker is reached with the CLI's settings: `BACE_BROKER_ADDR` (default
//! `http://127.0.0.1:50051`), `BACE_BROKER_CA_FILE`, `BACE_BROKER_CERT_FILE` and
//! `BACE_BROKER_KEY_FILE`, `BACE_BROKER_TOKEN_FILE`.

use std::process::ExitCode;

use bace_token_broker_client::{BrokerAuthMiddleware, BrokerClientBuilder, Error};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(account), Some(url)) = (args.next(), args.next()) else {
        eprintln!(
            "usage: call_bace ACCOUNT URL   (e.g. fleet-a https://api.bace-iot.com/api/v2/physical-device)"
        );
        return ExitCode::from(2);
    };
    let broker = match BrokerClientBuilder::from_env().build() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let http = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(BrokerAuthMiddleware::new(broker, account))
        .build();
    match http.get(&url).send().await {
        Ok(response) => {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            println!("{status}");
            println!("{body}");
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(reqwest_middleware::Error::Middleware(e)) => {
            match e.downcast_ref::<Error>() {
                Some(e) if e.is_retryable() => eprintln!("error (retry later): {e}"),
                Some(e) => eprintln!("error: {e}"),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
