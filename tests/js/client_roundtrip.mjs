// A chat client built on the official socket.io-client, driven by the Python tests.
//
// Usage: node client_roundtrip.mjs '<json spec>'
//   spec: {url, namespace, path, transports, auth,
//          emits: [{event, data}],   sent one by one after "welcome", each awaiting its ack
//          wait_for_text: "...",     optional: stay until a message with this text arrives
//          timeout_ms}
// Prints one JSON object per line: {"event": "welcome" | "ack" | "message" | "presence" |
// "connect_error" | "done" | "timeout", ...}. After "done" or a refusal it closes the socket
// and the caller ends the process; on timeout it exits 1 by itself.
import { connectOnce, deadline, out, spec } from "./harness.mjs";

const timer = deadline(15000);

const socket = connectOnce();

let sawAwaited = !spec.wait_for_text;
let emitsDone = false;

function finish() {
  if (!(sawAwaited && emitsDone)) return;
  out({ event: "done" });
  clearTimeout(timer);
  socket.close();
}

socket.on("connect_error", (err) => {
  out({ event: "connect_error", message: err.message, data: err.data ?? null });
  clearTimeout(timer);
  socket.close();
});

socket.on("message", (msg) => {
  out({ event: "message", data: msg });
  if (spec.wait_for_text && msg.text === spec.wait_for_text) {
    sawAwaited = true;
    finish();
  }
});

socket.on("presence", (data) => out({ event: "presence", data }));

socket.on("welcome", async (welcome) => {
  out({ event: "welcome", data: welcome, transport: socket.io.engine.transport.name });
  const emits = spec.emits ?? [];
  for (let index = 0; index < emits.length; index++) {
    const { event, data } = emits[index];
    const ack = await socket.timeout(5000).emitWithAck(event, data);
    out({ event: "ack", index, data: ack });
  }
  emitsDone = true;
  finish();
});
