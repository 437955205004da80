// The page of tests/proxy/test_ds_browser.py: a chat answer read from a durable_asgi mode-2
// stream with the official client (@durable-streams/client), bundled by esbuild. The page's
// URL names the stream (?stream=<pre-signed read URL>); the text read so far and the offset it
// ends at are kept in sessionStorage, so a reload resumes from that offset, never from 0.
import { stream } from "@durable-streams/client";

const url = new URL(location.href).searchParams.get("stream");
const answer = document.getElementById("answer");
const saved = JSON.parse(sessionStorage.getItem(url) ?? "null") ?? { text: "", offset: "-1" };
answer.textContent = saved.text;
document.body.dataset.resumed = String(saved.offset !== "-1");

try {
  const res = await stream({ url, offset: saved.offset, live: "sse" });
  document.body.dataset.state = "streaming";
  res.subscribeText(({ text, offset, streamClosed }) => {
    saved.text += text;
    saved.offset = offset;
    sessionStorage.setItem(url, JSON.stringify(saved));
    answer.textContent = saved.text;
    if (streamClosed) document.body.dataset.state = "done";
  });
  await res.closed;
  document.body.dataset.state = res.streamClosed ? "done" : "cut";
} catch (error) {
  document.body.dataset.error = String(error);
}
