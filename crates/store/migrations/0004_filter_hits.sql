-- Content-filter matches per request (blocked or redacted, input and output).
ALTER TABLE usage_records ADD COLUMN filter_hits BIGINT NOT NULL DEFAULT 0;
