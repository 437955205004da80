"""psycopg 3 or asyncpg for `PostgresStore`: the store's hot operations, timed on both.

    python bench/pg_drivers.py [--dsn postgresql://postgres@127.0.0.1:5432/test] [--rounds 5]

Each operation runs on one connection of each driver against the same tables (made in a schema
of their own and dropped after), in the shape the store needs:

- **append batch**: 200 streams' fenced appends (40 bytes each) in one transaction and one round
  trip. psycopg: ``executemany(returning=True)`` in pipeline mode; asyncpg: its pipelined
  ``executemany`` (which can't tell which rows were fenced out), and one ``unnest`` statement
  (which can).
- **mixed batch**: 100 appends, 50 renewals, 50 finishes — what a flush window holds under load:
  psycopg runs three statements in one pipeline, asyncpg needs a round trip per statement.
- **read**: 4 KiB from the middle of a 64 KiB body, with the stream's row, in one statement.
- **claim**: ``INSERT … ON CONFLICT DO UPDATE … WHERE claimable RETURNING``.

Prints wall time and this process's CPU time per operation (median of the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg

STREAMS = 200
SCHEMA = f"bench_{uuid.uuid4().hex[:8]}"
TABLES = f"""
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.streams (id text PRIMARY KEY, generation text NOT NULL,
    state text NOT NULL, version bigint NOT NULL, size bigint NOT NULL, chunks bigint NOT NULL,
    lease_expires_at double precision, expires_at double precision);
CREATE TABLE {SCHEMA}.segments (stream_id text NOT NULL, start bigint NOT NULL,
    chunks integer NOT NULL, data bytea NOT NULL, PRIMARY KEY (stream_id, start));
"""
NOW = "extract(epoch from clock_timestamp())"
FENCE = "id = {id} AND generation = {token} AND state = 'running'"
APPEND = (
    "WITH s AS (UPDATE {schema}.streams SET size = size + length({data}), "
    "chunks = chunks + {chunks}, version = version + 1 WHERE " + FENCE + " "
    "RETURNING id, size - length({data}) AS start) "
    "INSERT INTO {schema}.segments SELECT id, start, {chunks}, {data} FROM s RETURNING 1"
)
APPEND_UNNEST = (
    "WITH w AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int[]) "
    "AS w(id, token, data, chunks)), "
    "s AS (UPDATE {schema}.streams t SET size = t.size + length(w.data), "
    "chunks = t.chunks + w.chunks, version = t.version + 1 FROM w "
    "WHERE t.id = w.id AND t.generation = w.token AND t.state = 'running' "
    "RETURNING t.id, t.size - length(w.data) AS start, w.data, w.chunks) "
    "INSERT INTO {schema}.segments SELECT id, start, chunks, data FROM s RETURNING stream_id"
)
RENEW = (
    "UPDATE {schema}.streams SET lease_expires_at = " + NOW + " + 5 WHERE " + FENCE + " RETURNING 1"
)
FINISH = (
    "UPDATE {schema}.streams SET state = 'complete', expires_at = " + NOW + " + 60, "
    "version = version + 1 WHERE " + FENCE + " RETURNING 1"
)
READ = (
    "SELECT s.id, s.generation, s.state, s.version, s.size, (SELECT coalesce(string_agg("
    "substring(g.data from (greatest({off} - g.start, 0) + 1)::int "
    "for least({end} - greatest(g.start, {off}), 2147483647)::int),"
    " ''::bytea ORDER BY g.start), ''::bytea) FROM {schema}.segments g "
    "WHERE g.stream_id = s.id AND g.start < {end} AND g.start >= coalesce((SELECT max(start) "
    "FROM {schema}.segments WHERE stream_id = s.id AND start <= {off}), 0)) "
    "FROM {schema}.streams s WHERE s.id = {id}"
)
CLAIM = (
    "INSERT INTO {schema}.streams AS t VALUES ({id}, {token}, 'running', 1, 0, 0, "
    + NOW
    + " + 5, NULL) "
    "ON CONFLICT (id) DO UPDATE SET generation = excluded.generation, state = 'running', "
    "version = t.version + 1, size = 0, chunks = 0, lease_expires_at = excluded.lease_expires_at "
    "WHERE t.state <> 'running' OR t.lease_expires_at < " + NOW + " RETURNING version"
)


def sql(template: str, style: str) -> str:
    """`template` with psycopg's ``%(name)s`` or asyncpg's ``$n`` placeholders."""
    names = ["id", "token", "data", "chunks", "off", "end"]
    marks: dict[str, str]
    if style == "psycopg":
        marks = {n: f"%({n})s" for n in names}
    else:
        marks = {n: f"${i + 1}" for i, n in enumerate(names)}
    types = {"id": "text", "token": "text", "data": "bytea", "chunks": "int"}
    types |= {"off": "bigint", "end": "bigint"}
    return template.format(schema=SCHEMA, **{n: f"{marks[n]}::{types[n]}" for n in names})


def ids(tag: str) -> list[str]:
    return [f"{tag}-{i}" for i in range(STREAMS)]


async def reset(conn: psycopg.AsyncConnection[object], tag: str, *, finished: bool = False) -> None:
    """`STREAMS` running streams `tag-i` with token ``t`` (a 64 KiB body each for reads)."""
    state = "complete" if finished else "running"
    await conn.execute(f"DELETE FROM {SCHEMA}.segments WHERE stream_id LIKE %s", (tag + "-%",))
    await conn.execute(f"DELETE FROM {SCHEMA}.streams WHERE id LIKE %s", (tag + "-%",))
    await conn.execute(
        f"INSERT INTO {SCHEMA}.streams SELECT %s || '-' || i, 't', %s, 1, 65536, 16, NULL, NULL "
        f"FROM generate_series(0, {STREAMS - 1}) i",
        (tag, state),
    )
    await conn.execute(
        f"INSERT INTO {SCHEMA}.segments SELECT %s || '-' || i, j * 4096, 1, "
        f"decode(repeat('ab', 4096), 'hex') FROM generate_series(0, {STREAMS - 1}) i, "
        "generate_series(0, 15) j",
        (tag,),
    )


async def measure(
    label: str,
    run: Callable[[], Awaitable[None]],
    ops: int,
    rounds: int,
    setup: Callable[[], Awaitable[None]] | None = None,
) -> tuple[str, float, float]:
    walls, cpus = [], []
    for _ in range(rounds):
        if setup is not None:
            await setup()
        w0, c0 = time.perf_counter(), time.process_time()
        await run()
        walls.append((time.perf_counter() - w0) / ops * 1e6)
        cpus.append((time.process_time() - c0) / ops * 1e6)
    return label, statistics.median(walls), statistics.median(cpus)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pg = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
    apg = await asyncpg.connect(args.dsn)
    await pg.execute(TABLES)  # type: ignore[arg-type]
    rows: list[tuple[str, float, float]] = []
    try:
        data = b"x" * 40
        p_params = [{"id": i, "token": "t", "data": data, "chunks": 1} for i in ids("p")]
        a_params = [(i, "t", data, 1) for i in ids("a")]

        async def pg_appends() -> None:
            async with pg.transaction(), pg.pipeline(), pg.cursor() as cur:
                await cur.executemany(sql(APPEND, "psycopg"), p_params, returning=True)

        async def apg_executemany() -> None:
            async with apg.transaction():
                await apg.executemany(sql(APPEND, "asyncpg").replace(" RETURNING 1", ""), a_params)

        unnest = APPEND_UNNEST.format(schema=SCHEMA)
        columns = [list(column) for column in zip(*a_params, strict=True)]

        async def apg_unnest() -> None:
            await apg.fetch(unnest, *columns)

        async def pg_mixed() -> None:
            fenced = [{"id": i, "token": "t"} for i in ids("p")]
            async with pg.transaction(), pg.pipeline(), pg.cursor() as cur:
                await cur.executemany(sql(APPEND, "psycopg"), p_params[:100], returning=True)
                await cur.executemany(sql(RENEW, "psycopg"), fenced[100:150], returning=True)
                await cur.executemany(sql(FINISH, "psycopg"), fenced[150:], returning=True)

        async def apg_mixed() -> None:
            fenced = [(i, "t") for i in ids("a")]
            async with apg.transaction():
                await apg.fetch(unnest, *[c[:100] for c in columns])
                renew, finish = sql(RENEW, "asyncpg"), sql(FINISH, "asyncpg")
                await apg.fetch(
                    renew.replace("id = $1::text", "id = ANY($1::text[])").replace(
                        " RETURNING 1", ""
                    ),
                    [f[0] for f in fenced[100:150]],
                    "t",
                )
                await apg.fetch(
                    finish.replace("id = $1::text", "id = ANY($1::text[])").replace(
                        " RETURNING 1", ""
                    ),
                    [f[0] for f in fenced[150:]],
                    "t",
                )

        for label, run, tag in (
            ("append batch x200: psycopg pipeline", pg_appends, "p"),
            ("append batch x200: asyncpg executemany", apg_executemany, "a"),
            ("append batch x200: asyncpg unnest", apg_unnest, "a"),
            ("mixed batch x200: psycopg pipeline", pg_mixed, "p"),
            ("mixed batch x200: asyncpg 3 statements", apg_mixed, "a"),
        ):
            await reset(pg, tag)
            rows.append(await measure(label, run, STREAMS, args.rounds))

        await reset(pg, "r")
        read_ids = ids("r")
        p_read, a_read = sql(READ, "psycopg"), sql(READ, "asyncpg")

        async def pg_reads() -> None:
            for sid in read_ids:
                cur = await pg.execute(p_read, {"id": sid, "off": 30000, "end": 34096})
                await cur.fetchone()

        statement = await apg.prepare(a_read.replace("$5", "$2").replace("$6", "$3"))

        async def apg_reads() -> None:
            for sid in read_ids:
                await statement.fetchrow(sid, 30000, 34096)

        rows.append(await measure("read 4 KiB at an offset: psycopg", pg_reads, STREAMS, 5))
        rows.append(await measure("read 4 KiB at an offset: asyncpg", apg_reads, STREAMS, 5))

        p_claim, a_claim = sql(CLAIM, "psycopg"), sql(CLAIM, "asyncpg")

        async def finished() -> None:
            await reset(pg, "c", finished=True)

        async def pg_claims() -> None:
            for sid in ids("c"):
                cur = await pg.execute(p_claim, {"id": sid, "token": uuid.uuid4().hex})
                await cur.fetchone()

        async def apg_claims() -> None:
            for sid in ids("c"):
                await apg.fetchrow(a_claim, sid, uuid.uuid4().hex)

        for label, run in (("claim: psycopg", pg_claims), ("claim: asyncpg", apg_claims)):
            rows.append(await measure(label, run, STREAMS, args.rounds, finished))
    finally:
        await pg.execute(f"DROP SCHEMA {SCHEMA} CASCADE")  # type: ignore[arg-type]
        await pg.close()
        await apg.close()
    print(f"\n| operation (per op, median of {args.rounds}) | wall µs | client CPU µs |")
    print("| --- | ---: | ---: |")
    for label, wall, cpu in rows:
        print(f"| {label} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
