//! Fresh PostgreSQL databases for tests, on the server `SUBMITD_TEST_POSTGRES` names.

use sqlx::Connection;

/// A fresh database URL, or `None` (with a note on stderr) when the variable is unset.
pub async fn fresh_postgres() -> Option<String> {
    let Ok(url) = std::env::var("SUBMITD_TEST_POSTGRES") else {
        eprintln!("SUBMITD_TEST_POSTGRES is not set: PostgreSQL test skipped");
        return None;
    };
    sqlx::any::install_default_drivers();
    let name = format!("submitd_test_{:016x}", rand::random::<u64>());
    let mut admin = sqlx::AnyConnection::connect(&url)
        .await
        .expect("PostgreSQL reachable");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

/// Drops a database made by [`fresh_postgres`] (all its connections must be closed).
pub async fn drop_postgres(url: &str) {
    let Some((base, name)) = url.rsplit_once('/') else {
        return;
    };
    if let Ok(mut admin) = sqlx::AnyConnection::connect(&format!("{base}/postgres")).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut admin)
            .await;
    }
}
