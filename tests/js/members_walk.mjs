// Walks a room's member list with `members` pages on the official socket.io-client.
//
// Usage: node members_walk.mjs '<json spec>'
//   spec: {url, namespace, path, transports, auth, limit, timeout_ms}
// Prints one JSON object per line: {"event": "welcome", data} once welcomed, then
// {"event": "page", data: <the ack>} per page from `after: null` until `next` is null, then
// {"event": "done", members: [...every member of every page...]}; on a refusal
// {"event": "connect_error", ...}, on a failed page {"event": "failed", data}. It closes the
// socket after "done" (or a failure); on timeout it exits 1 by itself.
import { io } from "socket.io-client";

const spec = JSON.parse(process.argv[2]);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const MAX_PAGES = 1000;

const timer = setTimeout(() => {
  out({ event: "timeout" });
  process.exit(1);
}, spec.timeout_ms ?? 15000);

const socket = io(spec.url + spec.namespace, {
  path: spec.path,
  transports: spec.transports,
  auth: spec.auth,
  reconnection: false,
  forceNew: true,
});

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
