//! Several nodes on one PostgreSQL database: users, passwords, disabling and login throttling
//! are shared; queue ids carry the node name. Skipped (with a note) without
//! `SUBMITD_TEST_POSTGRES`; CI sets it.
mod common;

use common::postgres::{drop_postgres, fresh_postgres};
use common::*;

async fn two_nodes(url: &str, auth: &'static str) -> (TestServer, TestServer) {
    let a = TestServer::start_tuned(
        Tuning {
            database: url,
            node: "node1",
            auth,
            ..Tuning::default()
        },
        "",
    )
    .await;
    let b = TestServer::start_tuned(
        Tuning {
            database: url,
            node: "node2",
            auth,
            ..Tuning::default()
        },
        "",
    )
    .await;
    (a, b)
}

async fn login(server: &TestServer, user: &str, password: &str, expect: &str) {
    let mut c = server.client().await;
    c.expect("220").await;
    c.cmd("EHLO client.example", "250").await;
    c.starttls().await;
    c.cmd("EHLO client.example", "250").await;
    c.auth_plain(user, password, expect).await;
}

#[tokio::test]
async fn users_and_passwords_are_shared_at_once() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let (a, b) = two_nodes(&url, "").await;
    // Added through node 1's database handle, used on node 2.
    a.add_user("alice@example.org").await;
    login(&b, "alice@example.org", PASSWORD, "235 2.7.0").await;
    // A successful login is cached on node 2; disabling on node 1 still counts right away.
    a.store
        .set_disabled("alice@example.org", true)
        .await
        .unwrap();
    login(&b, "alice@example.org", PASSWORD, "535 5.7.8").await;
    a.store
        .set_disabled("alice@example.org", false)
        .await
        .unwrap();
    login(&b, "alice@example.org", PASSWORD, "235 2.7.0").await;
    // A new password set through node 2 replaces the cached one on node 1 too.
    login(&a, "alice@example.org", PASSWORD, "235 2.7.0").await;
    let hash = submitd::auth::hash_password("a new password").unwrap();
    b.store
        .set_password("alice@example.org", &hash)
        .await
        .unwrap();
    login(&a, "alice@example.org", PASSWORD, "535 5.7.8").await;
    login(&a, "alice@example.org", "a new password", "235 2.7.0").await;
    a.stop().await;
    b.stop().await;
    drop_postgres(&url).await;
}

#[tokio::test]
async fn failed_logins_count_across_nodes() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let (a, b) = two_nodes(&url, "max_failures_per_ip = 3").await;
    a.add_user("alice@example.org").await;
    a.add_user("bob@example.org").await;
    login(&a, "alice@example.org", "wrong", "535 5.7.8").await;
    login(&b, "alice@example.org", "wrong", "535 5.7.8").await;
    login(&a, "alice@example.org", "wrong", "535 5.7.8").await;
    // Three failures, spread over two nodes: both now cool the account off for this address.
    login(&a, "alice@example.org", PASSWORD, "454 4.7.0").await;
    login(&b, "alice@example.org", PASSWORD, "454 4.7.0").await;
    // Another user behind the same address is not affected.
    login(&b, "bob@example.org", PASSWORD, "235 2.7.0").await;
    a.stop().await;
    b.stop().await;
    drop_postgres(&url).await;
}

#[tokio::test]
async fn queue_ids_name_their_node() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let (a, b) = two_nodes(&url, "").await;
    a.add_user("alice@example.org").await;
    let mut ids = Vec::new();
    for node in [&a, &b] {
        let mut c = node.authenticated("alice@example.org").await;
        let r = c
            .send_message(
                "alice@example.org",
                &["bob@example.net"],
                &simple_message("alice@example.org", "bob@example.net", "n"),
            )
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        ids.push(r.text().rsplit(' ').next().unwrap().to_owned());
    }
    assert!(ids[0].ends_with("NODE1"), "{ids:?}");
    assert!(ids[1].ends_with("NODE2"), "{ids:?}");
    // Both submissions are traceable from either node's database handle.
    for id in &ids {
        assert!(a.store.find_trace(id).await.unwrap().is_some(), "{id}");
    }
    a.stop().await;
    b.stop().await;
    drop_postgres(&url).await;
}
