// The official TypeScript client (@durable-streams/client) against durable_asgi's mode 2, one
// step per run (tests/proxy/test_ds_ts_client.py): prints one JSON line and exits.
//
//   node ds_client.mjs create <base> <upstream-url> <secret> <cut-bytes>
//     POST <base> (create through the proxy), read the stream with SSE until <cut-bytes>
//     have come, then cut the connection: prints {location, offset, text}.
//   node ds_client.mjs resume <location> <offset>
//     read from <offset> with SSE until the stream closes: prints {text, offset, closed}.
import { stream } from "@durable-streams/client";

const [command, ...args] = process.argv.slice(2);

function print(answer) {
  process.stdout.write(JSON.stringify(answer) + "\n");
}

async function read(url, offset, enough) {
  const res = await stream({ url, offset, live: "sse" });
  let text = "";
  for await (const chunk of res.textStream()) {
    text += chunk;
    if (enough(text)) break;
  }
  const answer = { text, offset: res.offset, closed: res.streamClosed };
  res.cancel();
  return answer;
}

if (command === "create") {
  const [base, upstream, secret, cut] = args;
  const created = await fetch(base, {
    method: "POST",
    headers: { Authorization: `Bearer ${secret}`, "Upstream-URL": upstream, "Upstream-Method": "GET" },
  });
  if (created.status !== 201) {
    print({ ok: false, status: created.status, body: await created.text() });
    process.exit(1);
  }
  const location = new URL(created.headers.get("location"), base).toString();
  const got = await read(location, "-1", (text) => Buffer.byteLength(text) >= Number(cut));
  print({ ok: true, location, ...got });
} else if (command === "resume") {
  const [location, offset] = args;
  print({ ok: true, ...(await read(location, offset, () => false)) });
} else {
  print({ ok: false, error: `unknown command ${command}` });
  process.exit(2);
}
process.exit(0); // the connection goes with the process: a real cut
