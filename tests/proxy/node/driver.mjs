// Drives the unmodified npm `durablefetch` client for tests/proxy/test_durablefetch_client.py.
//
//   node driver.mjs <durablefetchHost>        e.g. 127.0.0.1:8443 (the proxy, spoken to in https)
//
// One JSON command a line on stdin, one JSON answer a line on stdout, in order:
//
//   {"op": "open", "stream": "a", "url": "https://127.0.0.2:9443/sse?n=20"}  -> {status, headers}
//   {"op": "read", "stream": "a", "until": 120}   -> {received, done}: read until >= 120 bytes
//   {"op": "rest", "stream": "a"}                 -> {received, done}: read to the end
//   {"op": "abort", "stream": "a"}                -> {}: abort the request mid-body
//   {"op": "fetch", "url": ...}                   -> {status, headers, received, done}
//   {"op": "isInProgress", "url": ...}            -> {result}
//   {"op": "delete", "url": ...}                  -> {result}
//
// `received` is every body byte the stream got so far, base64. Answers carry "ok": true, or
// "ok": false and the "error" (a body that ended abnormally also says what it "received").
import { createInterface } from 'node:readline'
import { DurableFetchClient } from 'durablefetch'

const df = new DurableFetchClient({ durablefetchHost: process.argv[2] })
const streams = new Map() // name -> {controller, reader, chunks, size, done}
let fetches = 0

function describe(error) {
    const cause = error.cause ? ` (${error.cause.code ?? error.cause.message})` : ''
    return `${error.name}: ${error.message}${cause}`
}

function body(stream) {
    return Buffer.concat(stream.chunks).toString('base64')
}

async function open({ stream: name, url, method, headers, body: content }) {
    const controller = new AbortController()
    const response = await df.fetch(url, {
        method,
        headers,
        body: content,
        signal: controller.signal,
    })
    const reader = response.body.getReader()
    streams.set(name, { controller, reader, chunks: [], size: 0, done: false })
    return { status: response.status, headers: [...response.headers] }
}

async function read(name, until = Infinity) {
    const stream = streams.get(name)
    try {
        while (!stream.done && stream.size < until) {
            const { value, done } = await stream.reader.read()
            if (done) stream.done = true
            else {
                stream.chunks.push(Buffer.from(value))
                stream.size += value.length
            }
        }
    } catch (error) {
        // A body that ended abnormally: say so, with what did arrive.
        return { ok: false, error: describe(error), received: body(stream), done: false }
    }
    return { received: body(stream), done: stream.done }
}

const ops = {
    open,
    read: ({ stream, until }) => read(stream, until),
    rest: ({ stream }) => read(stream),
    abort: ({ stream }) => {
        streams.get(stream).controller.abort()
        return {}
    },
    fetch: async (command) => {
        const name = `fetch-${++fetches}`
        const head = await open({ ...command, stream: name })
        return { ...head, ...(await read(name)) }
    },
    isInProgress: async ({ url }) => ({ result: await df.isInProgress(url) }),
    delete: async ({ url }) => ({ result: await df.delete(url) }),
}

for await (const line of createInterface({ input: process.stdin })) {
    let answer
    try {
        const command = JSON.parse(line)
        answer = { ok: true, ...(await ops[command.op](command)) }
    } catch (error) {
        answer = { ok: false, error: describe(error) }
    }
    process.stdout.write(JSON.stringify(answer) + '\n')
}
// stdin closed: the test is over. Hang up on whatever is still open, and go.
for (const stream of streams.values()) stream.controller.abort()
process.exit(0)
