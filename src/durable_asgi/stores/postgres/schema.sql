-- The tables of durable_asgi's PostgresStore, schema version 1.
--
-- The store runs this itself on first use (idempotent, under an advisory lock). Teams whose
-- migrations run elsewhere apply it from their own tool (a Django RunSQL migration, Alembic's
-- op.execute) and pass `create_schema=False`; the store then only checks the version.
-- {schema} and {prefix} stand for the store's `schema` and `prefix` options (defaults:
-- public and durable_); `PostgresStore(...).schema_sql()` returns this text with them filled in.

CREATE SCHEMA IF NOT EXISTS {schema};

-- One row per stream. Updated on every append, so it leaves room for HOT updates.
CREATE TABLE IF NOT EXISTS {schema}.{prefix}streams (
    id text PRIMARY KEY,
    generation text NOT NULL,            -- the producer's lease token (the fence)
    state text NOT NULL CHECK (state IN ('running', 'complete', 'failed', 'aborted')),
    version bigint NOT NULL,             -- bumped on every change readers can see
    size bigint NOT NULL,                -- body bytes stored
    chunks bigint NOT NULL,
    readers integer NOT NULL,
    status_code integer,
    headers text,                        -- JSON [[name, value], ...], latin-1 strings
    created_at double precision NOT NULL,  -- Unix seconds, the database's clock
    updated_at double precision NOT NULL,
    expires_at double precision,         -- a finished stream is forgotten then
    lease_expires_at double precision,   -- a running stream's producer must renew before then
    retain boolean NOT NULL
) WITH (fillfactor = 70);

CREATE INDEX IF NOT EXISTS {prefix}streams_by_expiry
    ON {schema}.{prefix}streams (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS {prefix}streams_running
    ON {schema}.{prefix}streams (lease_expires_at) WHERE state = 'running';

-- The body: one row per append (split at 1 MiB), keyed by its start offset.
CREATE TABLE IF NOT EXISTS {schema}.{prefix}segments (
    stream_id text NOT NULL,
    start bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (stream_id, start)
);
-- Uncompressed out-of-line storage: a read from an offset fetches only the slice it needs.
ALTER TABLE {schema}.{prefix}segments ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE IF NOT EXISTS {schema}.{prefix}meta (
    name text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO {schema}.{prefix}meta (name, value) VALUES ('schema_version', '1')
    ON CONFLICT (name) DO NOTHING;
