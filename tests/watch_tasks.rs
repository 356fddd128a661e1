//! WatchToken streams cost no task of the broker's own: the stream tonic polls is the broker's
//! token watch itself (a `watch` receiver), not a task forwarding into a channel.

use bace_token_broker::proto::{self, WatchTokenResponse};
use testkit::{BrokerConfig, BrokerServer, fake, guard};
use tonic::Streaming;

async fn open(broker: &BrokerServer) -> Streaming<WatchTokenResponse> {
    let mut stream = broker
        .client
        .clone()
        .watch_token(proto::WatchTokenRequest {
            account: "fleet-a".into(),
        })
        .await
        .expect("WatchToken")
        .into_inner();
    // The first message is the current token: the stream is open on both sides.
    stream.message().await.unwrap().expect("first token");
    stream
}

#[tokio::test]
async fn watchers_cost_no_task_each() {
    const WATCHERS: usize = 200;
    let fake = fake(&["fleet-a"]).await;
    let broker = BrokerServer::ready(&BrokerConfig::for_fake(&fake, &["fleet-a"])).await;
    let runtime = tokio::runtime::Handle::current().metrics();
    guard(async {
        // One stream first, so the connection's own tasks exist before counting.
        let first = open(&broker).await;
        let before = runtime.num_alive_tasks();
        let mut streams = Vec::with_capacity(WATCHERS);
        for _ in 0..WATCHERS {
            streams.push(open(&broker).await);
        }
        let added = runtime.num_alive_tasks() - before;
        // hyper runs each HTTP/2 stream as a task; a task per watcher on top of that would
        // double the count.
        assert!(
            added <= WATCHERS + WATCHERS / 4,
            "{added} tasks for {WATCHERS} watchers"
        );
        drop((first, streams));
    })
    .await;
    broker.stop().await.unwrap();
}
