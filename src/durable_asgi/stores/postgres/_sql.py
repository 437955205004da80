"""The SQL `PostgresStore` runs, for one schema and table prefix, and rows turned into
`StreamInfo`.

Producer writes are *set-based*: one statement applies a whole run of one kind of write (many
streams' appends, say) from arrays (``unnest``), each row fenced by its own lease token and
lease expiry, and answers which streams it applied to. A statement that changes what readers
see also sends, in the same statement, one ``pg_notify`` per 500 changed streams, carrying only
`change_tag` of each stream id (never data), delivered when the transaction commits.

Times are the database's clock (`NOW`): a lease runs from when the write ran, and every process
judges expiry by the same clock.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from .._base import info_from_row as to_info

__all__ = ["MAX_SEGMENT", "NOW", "SCHEMA_VERSION", "Sql", "change_tag", "schema_sql", "to_info"]

#: The schema version this release writes (``{prefix}meta``, name ``schema_version``).
SCHEMA_VERSION = 1
#: Appends larger than this are stored as several segments (rows), so a read never loads
#: more than about this much of a segment it only needs part of.
MAX_SEGMENT = 1 << 20

NOW = "extract(epoch from clock_timestamp())::float8"
COLUMNS = (
    "id, generation, state, version, size, chunks, readers, status_code, headers, created_at, "
    "updated_at, expires_at, lease_expires_at, retain"
)
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_PREFIX = re.compile(r"[a-z0-9_]{0,20}")


def change_tag(stream_id: str) -> str:
    """What a notification carries for a stream: 12 hex digits of the MD5 of its id (the same
    as ``left(md5(id), 12)`` in SQL). Fixed-size, so 500 fit one payload; a collision only
    wakes a reader that re-checks."""
    return hashlib.md5(stream_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def check_names(schema: str, prefix: str) -> None:
    """`ValueError` unless `schema` and `prefix` make plain lower-case identifiers."""
    if not _IDENTIFIER.fullmatch(schema):
        raise ValueError(
            f"schema {schema!r} must be a lower-case identifier: letters, digits, underscores"
        )
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must be lower-case letters, digits and underscores")


def schema_sql(schema: str, prefix: str) -> str:
    """``schema.sql`` with `schema` and `prefix` filled in."""
    check_names(schema, prefix)
    text = resources.files(__package__).joinpath("schema.sql").read_text("utf-8")
    return text.replace("{schema}", schema).replace("{prefix}", prefix)


class Sql:
    """Every statement, for the tables ``{schema}.{prefix}streams`` / ``segments`` / ``meta``
    and the notification channel ``{schema}.{prefix}changes``."""

    def __init__(self, schema: str, prefix: str) -> None:
        check_names(schema, prefix)
        streams = f"{schema}.{prefix}streams"
        segments = f"{schema}.{prefix}segments"
        self.meta = f"{schema}.{prefix}meta"
        self.channel = f"{schema}.{prefix}changes"
        live = f"(expires_at IS NULL OR expires_at > {NOW})"
        #: The fence of every producer write: the lease is current and hasn't run out.
        fence = (
            f"t.id = w.id AND t.generation = w.token AND t.state = 'running' "
            f"AND t.lease_expires_at >= {NOW}"
        )

        # The rows of the streams in `w`, locked in id order before any is written: every
        # multi-row writer (this process's batch writers, other workers') takes the rows it
        # shares with another in the same order, so none deadlocks on the other.
        w_locked = (
            f"(SELECT w.* FROM w JOIN (SELECT id FROM {streams} WHERE id IN (SELECT id FROM w) "
            "ORDER BY id FOR UPDATE) AS l USING (id)) AS w"
        )

        def notify(changed: str) -> str:
            # One payload per 500 streams (12 hex digits and a space each: under 8,000 bytes).
            return (
                f"n AS (SELECT pg_notify('{self.channel}', string_agg(tag, ' ')) FROM "
                f"(SELECT left(md5(id), 12) AS tag, (row_number() OVER ()) / 500 AS page "
                f"FROM {changed}) tags GROUP BY page)"
            )

        self.lock = "SELECT pg_advisory_xact_lock(hashtext($1))"
        self.schema_version = f"SELECT value FROM {self.meta} WHERE name = 'schema_version'"
        self.claim = (
            "WITH w AS (SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::bool[]) "
            "AS w(id, token, seconds, replace)), "
            f"c AS (INSERT INTO {streams} AS t ({COLUMNS}) "
            f"SELECT w.id, w.token, 'running', 1, 0, 0, 0, NULL, NULL, {NOW}, {NOW}, NULL, "
            f"{NOW} + w.seconds, true FROM w ORDER BY w.id "
            "ON CONFLICT (id) DO UPDATE SET generation = excluded.generation, "
            "state = 'running', version = t.version + 1, size = 0, chunks = 0, "
            f"readers = CASE WHEN t.expires_at <= {NOW} THEN 0 ELSE t.readers END, "
            "status_code = NULL, headers = NULL, created_at = excluded.created_at, "
            "updated_at = excluded.updated_at, expires_at = NULL, "
            "lease_expires_at = excluded.lease_expires_at, retain = true "
            # Claimable (see `is_claimable`): expired, failed, not retained, a running stream
            # whose lease ran out, or with `replace` any stream that isn't running.
            f"WHERE t.expires_at <= {NOW} OR t.state = 'failed' OR NOT t.retain "
            f"OR (t.state = 'running' AND t.lease_expires_at < {NOW}) "
            "OR (t.state <> 'running' AND (SELECT r.replace FROM w r WHERE r.id = t.id)) "
            f"RETURNING t.*), "
            f"d AS (DELETE FROM {segments} WHERE stream_id IN (SELECT id FROM c)), "
            f"{notify('c')} "
            f"SELECT {COLUMNS}, (SELECT count(*) FROM n) AS notified FROM c"
        )
        self.select = f"SELECT {COLUMNS} FROM {streams} WHERE id = ANY($1::text[]) AND {live}"
        self.info = f"SELECT {COLUMNS} FROM {streams} WHERE id = $1 AND {live}"
        self.seen = f"SELECT generation, version FROM {streams} WHERE id = $1 AND {live}"
        self.start = (
            "WITH w AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[]) "
            "AS w(id, token, status, headers)), "
            f"s AS (UPDATE {streams} AS t SET status_code = w.status, headers = w.headers, "
            f"version = t.version + 1, updated_at = {NOW} FROM {w_locked} WHERE {fence} "
            "RETURNING t.id, t.version, t.updated_at), "
            f"{notify('s')} SELECT s.*, (SELECT count(*) FROM n) AS notified FROM s"
        )
        self.append = (
            "WITH w AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) "
            "AS w(id, token, size, chunks)), "
            f"s AS (UPDATE {streams} AS t SET size = t.size + w.size, "
            f"chunks = t.chunks + w.chunks, version = t.version + 1, updated_at = {NOW} "
            f"FROM {w_locked} WHERE {fence} "
            "RETURNING t.id, t.size - w.size AS base, t.version, t.size, t.chunks, t.updated_at), "
            f"p AS (INSERT INTO {segments} (stream_id, start, data) "
            "SELECT s.id, s.base + q.rel, q.data FROM s JOIN "
            "unnest($5::text[], $6::int8[], $7::bytea[]) AS q(id, rel, data) ON q.id = s.id), "
            f"{notify('s')} SELECT s.*, (SELECT count(*) FROM n) AS notified FROM s"
        )
        self.renew = (
            "WITH w AS (SELECT * FROM unnest($1::text[], $2::text[], $3::float8[]) "
            "AS w(id, token, seconds)) "
            f"UPDATE {streams} AS t SET lease_expires_at = {NOW} + w.seconds FROM {w_locked} "
            f"WHERE {fence} RETURNING t.id, t.lease_expires_at"
        )
        self.finish = (
            "WITH w AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], "
            "$5::bool[]) AS w(id, token, state, ttl, retain)), "
            f"s AS (UPDATE {streams} AS t SET state = w.state, expires_at = {NOW} + w.ttl, "
            "lease_expires_at = NULL, retain = w.retain, version = t.version + 1, "
            f"updated_at = {NOW} FROM {w_locked} WHERE {fence} RETURNING t.id), "
            f"{notify('s')} SELECT s.*, (SELECT count(*) FROM n) AS notified FROM s"
        )
        self.attach = (
            "WITH w AS (SELECT * FROM unnest($1::text[], $2::int[]) AS w(id, delta)) "
            f"UPDATE {streams} AS t SET readers = greatest(0, t.readers + w.delta) "
            f"FROM {w_locked} "
            "WHERE t.id = w.id RETURNING t.id, t.readers"
        )
        self.check = (
            f"SELECT 1 FROM {streams} AS t, (SELECT $1::text AS id, $2::text AS token) AS w "
            f"WHERE {fence}"
        )
        # Only a running stream whose lease holds: one that ran out has already `failed`.
        self.abort = (
            f"WITH s AS (UPDATE {streams} SET state = 'aborted', lease_expires_at = NULL, "
            f"expires_at = {NOW} + $2, version = version + 1, updated_at = {NOW} "
            f"WHERE id = $1 AND state = 'running' AND lease_expires_at >= {NOW} RETURNING id), "
            f"{notify('s')} SELECT s.id, (SELECT count(*) FROM n) AS notified FROM s"
        )
        self.delete = (
            f"WITH s AS (DELETE FROM {streams} WHERE id = $1 "
            f"RETURNING id, {live} AS live), "
            f"g AS (DELETE FROM {segments} WHERE stream_id = $1), "
            f"{notify('s')} SELECT s.live, (SELECT count(*) FROM n) AS notified FROM s"
        )
        # Expired streams, and running ones whose producer died `$1` seconds ago or more.
        self.purge = (
            f"WITH s AS (DELETE FROM {streams} WHERE id IN (SELECT id FROM {streams} "
            f"WHERE expires_at <= {NOW} OR (state = 'running' AND lease_expires_at < {NOW} - $1) "
            "ORDER BY id FOR UPDATE) RETURNING id), "
            f"g AS (DELETE FROM {segments} WHERE stream_id IN (SELECT id FROM s)), "
            f"{notify('s')} SELECT s.id, (SELECT count(*) FROM n) AS notified FROM s"
        )
        # One statement, so one snapshot: the stream's row and the part of the body in
        # [$2, $3), from the segment holding $2 on (found through the primary key).
        self.read = (
            f"SELECT {', '.join('s.' + c for c in COLUMNS.split(', '))}, "
            "(SELECT coalesce(string_agg(substring(g.data "
            "from (greatest($2 - g.start, 0) + 1)::int "
            "for least($3 - greatest(g.start, $2), 2147483647)::int), ''::bytea "
            f"ORDER BY g.start), ''::bytea) FROM {segments} g WHERE g.stream_id = s.id "
            "AND g.start < $3 AND g.start >= coalesce((SELECT max(start) FROM "
            f"{segments} WHERE stream_id = s.id AND start <= $2), 0)) AS part "
            f"FROM {streams} s WHERE s.id = $1 AND "
            f"(s.expires_at IS NULL OR s.expires_at > {NOW})"
        )
        self.scan = f"SELECT {COLUMNS} FROM {streams} WHERE id > $1 AND {live} ORDER BY id LIMIT $2"
        # A running stream whose lease ran out counts as failed (`effective`).
        self.stats = (
            f"SELECT CASE WHEN state = 'running' AND lease_expires_at < {NOW} THEN 'failed' "
            "ELSE state END AS effective, count(*) AS n, coalesce(sum(size), 0) AS size, "
            f"min(created_at) AS oldest FROM {streams} WHERE {live} GROUP BY effective"
        )
