-- Accounts with prepaid balances (integer micro-units; `balance` is what is available now,
-- `reserved` what requests in flight hold), managed API keys, the ledger of every credit and
-- charge, and one usage record per request.
-- Written once for both SQLite and PostgreSQL: text ids, BIGINT integers, epoch milliseconds.

CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    balance BIGINT NOT NULL DEFAULT 0 CHECK (balance >= 0),
    reserved BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    rpm BIGINT,
    tpm BIGINT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE ledger (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount BIGINT NOT NULL,
    kind TEXT NOT NULL,
    request_id TEXT,
    note TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX ledger_account ON ledger (account_id, created_at);
CREATE UNIQUE INDEX ledger_charge_once ON ledger (request_id);

CREATE TABLE usage_records (
    request_id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    key_id TEXT,
    account_id TEXT,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost BIGINT NOT NULL,
    latency_ms BIGINT NOT NULL,
    ttft_ms BIGINT,
    status BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    user_id TEXT,
    labels TEXT NOT NULL
);
CREATE INDEX usage_time ON usage_records (created_at);
CREATE INDEX usage_key ON usage_records (key_id, created_at);
CREATE INDEX usage_account ON usage_records (account_id, created_at);

CREATE TABLE usage_labels (
    request_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (request_id, name)
);
CREATE INDEX usage_labels_name ON usage_labels (name, value);
