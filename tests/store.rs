//! Every store operation, against SQLite and (when `SUBMITD_TEST_POSTGRES` names a server)
//! PostgreSQL, each in a fresh database.

mod common;

use std::time::{Duration, SystemTime};

use common::postgres::{drop_postgres, fresh_postgres};

use submitd::config::ReceivedPolicy;
use submitd::store::trace::{Outcome, TraceRecord, TraceWriter};
use submitd::store::{Backend, Store, StoreError};

async fn exercise(store: &Store) {
    // Users.
    let id = store
        .add_user("alice@example.org", "$argon2id$hash1")
        .await
        .unwrap();
    assert!(matches!(
        store.add_user("alice@example.org", "x").await,
        Err(StoreError::DuplicateUser(_))
    ));
    let alice = store.find_user("alice@example.org").await.unwrap().unwrap();
    assert_eq!(
        (alice.id, alice.disabled, alice.received),
        (id, false, None)
    );
    assert!(store
        .find_user("nobody@example.org")
        .await
        .unwrap()
        .is_none());
    store
        .set_password("alice@example.org", "$argon2id$hash2")
        .await
        .unwrap();
    store.set_disabled("alice@example.org", true).await.unwrap();
    store
        .set_received_policy("alice@example.org", Some(ReceivedPolicy::Keep))
        .await
        .unwrap();
    let alice = store.find_user("alice@example.org").await.unwrap().unwrap();
    assert_eq!(alice.password_hash, "$argon2id$hash2");
    assert!(alice.disabled);
    assert_eq!(alice.received, Some(ReceivedPolicy::Keep));
    assert!(matches!(
        store.set_disabled("nobody@example.org", true).await,
        Err(StoreError::UnknownUser(_))
    ));
    store.add_user("bob@example.org", "h").await.unwrap();
    let emails: Vec<String> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.email)
        .collect();
    assert_eq!(emails, ["alice@example.org", "bob@example.org"]);

    // Allowed senders.
    store
        .allow_sender("alice@example.org", "@alice.example")
        .await
        .unwrap();
    store
        .allow_sender("alice@example.org", "team@example.org")
        .await
        .unwrap();
    store
        .allow_sender("alice@example.org", "team@example.org")
        .await
        .unwrap();
    assert_eq!(
        store.allowed_senders(id).await.unwrap(),
        ["@alice.example", "team@example.org"]
    );
    assert!(store
        .deny_sender("alice@example.org", "team@example.org")
        .await
        .unwrap());
    assert!(!store
        .deny_sender("alice@example.org", "team@example.org")
        .await
        .unwrap());
    assert!(matches!(
        store.allow_sender("nobody@example.org", "@x.example").await,
        Err(StoreError::UnknownUser(_))
    ));

    // Trace records.
    let now = SystemTime::now();
    let record = TraceRecord {
        queue_id: "Q1".into(),
        user: "alice@example.org".into(),
        client_ip: "192.0.2.7".into(),
        ehlo: "[192.168.1.2]".into(),
        tls_version: "TLSv1.3".into(),
        received_at: submitd::message::unix_seconds(now) - 40 * 86400,
        sender: "alice@example.org".into(),
        recipients: vec!["bob@example.net".into(), "carol@example.net".into()],
        outcome: Default::default(),
    };
    store.insert_trace(&record).await.unwrap();
    store
        .record_outcome("Q1", "bob@example.net", "delivered")
        .await
        .unwrap();
    let found = store.find_trace("Q1").await.unwrap().unwrap();
    assert_eq!(found.client_ip, "192.0.2.7");
    assert_eq!(found.recipients.len(), 2);
    assert_eq!(
        found.outcome.get("bob@example.net").map(String::as_str),
        Some("delivered")
    );

    // The batched writer: several sessions' records in one statement, outcomes in another,
    // the later of two outcomes for one recipient winning.
    let (writer, task) = TraceWriter::start(store.clone());
    let sessions: Vec<_> = (2..5)
        .map(|n| {
            let writer = writer.clone();
            let record = TraceRecord {
                queue_id: format!("Q{n}"),
                ..record.clone()
            };
            tokio::spawn(async move { writer.insert(record).await })
        })
        .collect();
    for session in sessions {
        session.await.unwrap().unwrap();
    }
    for (rcpt, outcome) in [
        ("bob@example.net", "failed: 451 4.4.1 try later"),
        ("bob@example.net", "delivered"),
        ("carol@example.net", "failed: 550 5.1.1 no such user"),
    ] {
        writer.outcome(Outcome {
            queue_id: "Q3".into(),
            recipient: rcpt.into(),
            outcome: outcome.into(),
        });
    }
    // An outcome without a submission (none is written for DSNs; this one is a stray) is
    // pruned with the old records.
    writer.outcome(Outcome {
        queue_id: "STRAY".into(),
        recipient: "x@example.net".into(),
        outcome: "delivered".into(),
    });
    writer.stop();
    task.await.unwrap();
    assert!(matches!(
        writer.insert(record.clone()).await,
        Err(StoreError::Unavailable(_))
    ));
    let q3 = store.find_trace("Q3").await.unwrap().unwrap();
    assert_eq!(q3.client_ip, "192.0.2.7");
    assert_eq!(
        q3.outcome,
        [
            ("bob@example.net".to_owned(), "delivered".to_owned()),
            (
                "carol@example.net".to_owned(),
                "failed: 550 5.1.1 no such user".to_owned()
            ),
        ]
        .into()
    );
    assert!(store.find_trace("Q4").await.unwrap().is_some());

    assert_eq!(
        store
            .prune_traces(Duration::from_secs(30 * 86400), now)
            .await
            .unwrap(),
        4
    );
    assert!(store.find_trace("Q1").await.unwrap().is_none());
    assert!(store.find_trace("Q3").await.unwrap().is_none());
    // The stray outcome went too: a record made now under its id starts without outcomes.
    store
        .insert_trace(&TraceRecord {
            queue_id: "STRAY".into(),
            received_at: submitd::message::unix_seconds(now),
            ..record.clone()
        })
        .await
        .unwrap();
    assert!(store
        .find_trace("STRAY")
        .await
        .unwrap()
        .unwrap()
        .outcome
        .is_empty());

    // Deleting a user takes their addresses along.
    store.delete_user("alice@example.org").await.unwrap();
    assert!(store
        .find_user("alice@example.org")
        .await
        .unwrap()
        .is_none());
    assert!(store.allowed_senders(id).await.unwrap().is_empty());
    assert!(matches!(
        store.delete_user("alice@example.org").await,
        Err(StoreError::UnknownUser(_))
    ));
}

#[tokio::test]
async fn sqlite_store_operations() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/sub/dir/submitd.db", dir.path().display());
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    exercise(&store).await;
    store.close().await;
    // Opening again applies no migration twice.
    Store::open(&url).await.unwrap().close().await;
}

#[tokio::test]
async fn postgres_store_operations() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    exercise(&store).await;
    store.close().await;
    drop_postgres(&url).await;
}

#[tokio::test]
async fn postgres_migrations_are_safe_when_nodes_start_together() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let (a, b, c) = tokio::join!(Store::open(&url), Store::open(&url), Store::open(&url));
    for store in [a.unwrap(), b.unwrap(), c.unwrap()] {
        store.close().await;
    }
    drop_postgres(&url).await;
}
