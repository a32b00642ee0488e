//! The service as an embedder holds it: built without a runtime, called directly as a
//! hyper `Service`, dropped when the embedder is done. Its background work (the quota
//! map's sweeper) must start with it and end with it, whoever serves it.

use std::sync::Arc;
use std::time::Duration;

use askstream::quota::QuotaMap;
use askstream::{AskService, ServiceConfig};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::service::Service;

fn health() -> Request<Full<Bytes>> {
    Request::get("/healthz").body(Full::default()).unwrap()
}

/// Tasks alive on this test's runtime right now.
fn alive() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Lets spawned and cancelled tasks run to their next await.
async fn settle_tasks() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn a_service_builds_outside_a_runtime() {
    let service = AskService::builder(ServiceConfig::default()).build();
    assert!(service.is_ok(), "{service:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn housekeeping_starts_with_the_first_request_and_ends_with_the_service() {
    let quota = Arc::new(QuotaMap::new(Duration::from_secs(1)));
    let service = AskService::builder(ServiceConfig::default())
        .quota(quota.clone())
        .build()
        .expect("builds");
    settle_tasks().await;
    let before = alive();

    let res = service.call(health()).await.expect("never Err");
    assert_eq!(res.status(), 200);
    let _ = res.into_body().collect().await;
    settle_tasks().await;
    assert_eq!(
        alive(),
        before + 1,
        "the sweeper runs once the service serves"
    );

    // More requests start nothing more.
    for _ in 0..3 {
        let _ = service.call(health()).await.expect("never Err");
    }
    let clone = service.clone();
    let _ = clone.call(health()).await.expect("never Err");
    settle_tasks().await;
    assert_eq!(
        alive(),
        before + 1,
        "one sweeper per service, not per call or clone"
    );

    drop(service);
    settle_tasks().await;
    assert_eq!(alive(), before + 1, "a clone still holds the service");
    drop(clone);
    settle_tasks().await;
    assert_eq!(
        alive(),
        before,
        "the sweeper ends with the service's last clone"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_embedded_service_sweeps_its_idle_users() {
    let quota = Arc::new(QuotaMap::new(Duration::from_secs(1)));
    // An entry from a window that has ended: idle, and due to be swept.
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    quota.charge_at("idle", 5, an_hour_ago).unwrap().settle();
    assert_eq!(quota.len(), 1);
    let service = AskService::builder(ServiceConfig::default())
        .quota(quota.clone())
        .build()
        .expect("builds");
    let _ = service.call(health()).await.expect("never Err");
    // The sweeper's period is the window (1 s here); the sweep itself runs on the
    // blocking pool, so wait for its result rather than for a number of ticks.
    let mut waited = Duration::ZERO;
    while !quota.is_empty() {
        assert!(
            waited < Duration::from_secs(600),
            "the idle user was never swept"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += Duration::from_secs(1);
    }
}
