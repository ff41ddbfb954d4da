//! Retention against the real server: the TTL indexes of readings and dead letters follow the
//! settings across restarts, changed in place, and retention off removes the readings' index.
//! (That MongoDB then deletes expired documents is its TTL monitor's job, once a minute: not
//! waited for here.)

use bson::{Document, doc};
use futures_util::TryStreamExt;

use crate::helpers::{AppOptions, TestApp, unique};

const DAY: i64 = 86_400;

/// `expireAfterSeconds` of the index `name`, `None` when the index does not exist, `Some(None)`
/// when it exists without one.
async fn ttl(app: &TestApp, collection: &str, name: &str) -> Option<Option<i64>> {
    let indexes: Vec<mongodb::IndexModel> = app
        .mongo()
        .await
        .collection::<Document>(collection)
        .list_indexes()
        .await
        .expect("list indexes")
        .try_collect()
        .await
        .expect("indexes");
    indexes.into_iter().find_map(|index| {
        let options = index.options?;
        (options.name.as_deref() == Some(name)).then(|| {
            options
                .expire_after
                .map(|d| i64::try_from(d.as_secs()).unwrap())
        })
    })
}

async fn spawn(store: &(String, String), args: &[&str]) -> TestApp {
    TestApp::spawn_with(AppOptions {
        share_store_with: Some(store.clone()),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..AppOptions::default()
    })
    .await
}

#[tokio::test]
async fn retention_indexes_follow_the_settings_in_place() {
    let store = (unique("test"), unique("t"));

    // The defaults: history kept forever, dead letters for seven days.
    let mut app = spawn(&store, &[]).await;
    assert_eq!(ttl(&app, "sensor_readings", "timestamp_ttl").await, None);
    assert_eq!(
        ttl(&app, "dead_letters", "received_at_ttl").await,
        Some(Some(7 * DAY))
    );
    assert!(app.terminate().await);

    let mut app = spawn(
        &store,
        &[
            "--reading-retention-days",
            "30",
            "--dead-letter-ttl-days",
            "3",
        ],
    )
    .await;
    assert_eq!(
        ttl(&app, "sensor_readings", "timestamp_ttl").await,
        Some(Some(30 * DAY))
    );
    assert_eq!(
        ttl(&app, "dead_letters", "received_at_ttl").await,
        Some(Some(3 * DAY))
    );
    assert!(app.logs().contains("ChangedInPlace"), "{}", app.logs());
    assert!(app.terminate().await);

    // Another value: the same index, its expiry changed (collMod), not an error about
    // conflicting index options.
    let mut app = spawn(&store, &["--reading-retention-days", "365"]).await;
    assert_eq!(
        ttl(&app, "sensor_readings", "timestamp_ttl").await,
        Some(Some(365 * DAY))
    );
    assert_eq!(
        ttl(&app, "dead_letters", "received_at_ttl").await,
        Some(Some(7 * DAY))
    );
    assert!(app.logs().contains("ChangedInPlace"), "{}", app.logs());
    assert!(app.terminate().await);

    // Retention off again: the index is gone, the query indexes stay.
    let app = spawn(&store, &["--reading-retention-days", "0"]).await;
    assert_eq!(ttl(&app, "sensor_readings", "timestamp_ttl").await, None);
    assert!(
        ttl(&app, "sensor_readings", "timestamp_sensor_id_kind")
            .await
            .is_some()
    );
}

#[tokio::test]
async fn a_collection_another_program_fills_is_reported_at_start() {
    let store = (unique("test"), unique("t"));
    let mongo = mongodb::Client::with_uri_str(&crate::helpers::shared().mongodb_uri)
        .await
        .expect("mongo client");
    // What the original Python service wrote: a generated ObjectId, no kind.
    mongo
        .database(&store.0)
        .collection::<Document>("sensor_readings")
        .insert_one(doc! {"sensor_id": "py-1", "value": "21.5", "timestamp": "2026-01-01T00:00:00"})
        .await
        .expect("insert");
    let app = spawn(&store, &[]).await;
    assert!(
        app.logs().contains("documents sensorhub did not write"),
        "{}",
        app.logs()
    );

    let clean = TestApp::spawn().await;
    assert!(!clean.logs().contains("documents sensorhub did not write"));
}
