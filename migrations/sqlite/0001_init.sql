-- Users, their extra sender addresses, and the trace of each submission.
-- Times are seconds since the Unix epoch; booleans are 0/1 (portable through sqlx's Any driver).
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    disabled BIGINT NOT NULL DEFAULT 0,
    received_policy TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE allowed_senders (
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    PRIMARY KEY (user_id, address)
);

CREATE TABLE submissions (
    queue_id TEXT PRIMARY KEY,
    user_email TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    ehlo TEXT NOT NULL,
    tls_version TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX submissions_received_at ON submissions (received_at);
