-- What each running replica holds for its requests in flight, per account, refreshed with every
-- settlement batch and a heartbeat. A replica that stops refreshing (it crashed) has its holds
-- given back to the accounts by the others.

CREATE TABLE replica_holds (
    replica_id TEXT NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount BIGINT NOT NULL CHECK (amount >= 0),
    seen_at BIGINT NOT NULL,
    PRIMARY KEY (replica_id, account_id)
);
CREATE INDEX replica_holds_seen ON replica_holds (seen_at);
