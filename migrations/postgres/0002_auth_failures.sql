-- Failed logins, shared by every node on the database, so that throttling counts attempts
-- across nodes. Rows older than the lockout window are pruned.
CREATE TABLE auth_failures (
    account TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    failed_at BIGINT NOT NULL
);
CREATE INDEX auth_failures_account ON auth_failures (account, failed_at);
CREATE INDEX auth_failures_failed_at ON auth_failures (failed_at);
