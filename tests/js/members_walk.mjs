// Walks a room's member list with `members` pages on the official socket.io-client.
//
// Usage: node members_walk.mjs '<json spec>'
//   spec: {url, namespace, path, transports, auth, limit, timeout_ms}
// Prints one JSON object per line: {"event": "welcome", data} once welcomed, then
// {"event": "page", data: <the ack>} per page from `after: null` until `next` is null, then
// {"event": "done", members: [...every member of every page...]}; on a refusal
// {"event": "connect_error", ...}, on a failed page {"event": "failed", data}. It closes the
// socket after "done" (or a failure); on timeout it exits 1 by itself.
import { connectOnce, deadline, out, spec } from "./harness.mjs";

const MAX_PAGES = 1000;

const timer = deadline(15000);

const socket = connectOnce();

function end() {
  clearTimeout(timer);
  socket.close();
}

socket.on("connect_error", (err) => {
  out({ event: "connect_error", message: err.message, data: err.data ?? null });
  end();
});

socket.on("welcome", async (welcome) => {
  out({ event: "welcome", data: welcome, transport: socket.io.engine.transport.name });
  const members = [];
  let after = null;
  for (let n = 0; n < MAX_PAGES; n++) {
    const page = await socket.timeout(5000).emitWithAck("members", { after, limit: spec.limit });
    out({ event: "page", data: page });
    if (!page.ok) {
      out({ event: "failed", data: page });
      end();
      return;
    }
    members.push(...page.members);
    after = page.next;
    if (after === null) break;
  }
  out({ event: "done", members });
  end();
});
