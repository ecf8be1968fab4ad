-- Projects (saved prompt and parameter bundles), server-side sessions with their messages,
-- stored completions with filterable metadata, A/B campaigns, feedback on responses, and the
-- usage columns that tie a request to its project, campaign variant, session, parent request
-- and tags.
-- Written once for both SQLite and PostgreSQL: text ids, BIGINT integers, epoch milliseconds,
-- JSON kept as TEXT, DOUBLE PRECISION floats.

CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    account_id TEXT REFERENCES accounts (id),
    spec TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX projects_account ON projects (account_id);

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    account_id TEXT,
    project_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX sessions_account ON sessions (account_id, updated_at);

CREATE TABLE session_messages (
    session_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE stored_completions (
    id TEXT PRIMARY KEY,
    account_id TEXT,
    model TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    metadata TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE INDEX stored_completions_account ON stored_completions (account_id, created_at);
CREATE INDEX stored_completions_time ON stored_completions (created_at, id);

CREATE TABLE stored_completion_metadata (
    completion_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (completion_id, name)
);
CREATE INDEX stored_completion_metadata_name ON stored_completion_metadata (name, value);

CREATE TABLE campaigns (
    id TEXT PRIMARY KEY,
    key TEXT UNIQUE,
    name TEXT NOT NULL,
    account_id TEXT,
    project_id TEXT,
    spec TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX campaigns_account ON campaigns (account_id);

CREATE TABLE feedback (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    completion_id TEXT NOT NULL,
    account_id TEXT,
    score DOUBLE PRECISION,
    label TEXT,
    comment TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX feedback_request ON feedback (request_id);

ALTER TABLE usage_records ADD COLUMN project_id TEXT;
ALTER TABLE usage_records ADD COLUMN campaign_id TEXT;
ALTER TABLE usage_records ADD COLUMN variant TEXT;
ALTER TABLE usage_records ADD COLUMN session_id TEXT;
ALTER TABLE usage_records ADD COLUMN parent_id TEXT;
ALTER TABLE usage_records ADD COLUMN tags TEXT;
CREATE INDEX usage_campaign ON usage_records (campaign_id, variant);
CREATE INDEX usage_project ON usage_records (project_id, created_at);

CREATE TABLE usage_tags (
    request_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (request_id, tag)
);
CREATE INDEX usage_tags_tag ON usage_tags (tag);
