// A long-lived chat client on the official socket.io-client, steered by the Python tests
// through stdin, for what happens around a node's shutdown.
//
// Usage: node client_session.mjs '<json spec>'
//   spec: {url, namespace, path, transports, auth, reconnection (default true),
//          reconnection_delay_ms, reconnection_delay_max_ms, timeout_ms}
// The auth object is sent from a function, so every reconnect carries `last_seq`: the
// highest message seq this client has seen (once it has seen one), as a page would.
// stdin, one JSON command a line:
//   {"cmd": "emit", "event", "data"}  emit with ack; prints {"event": "ack", "data"}
//   {"cmd": "close"}                  socket.close(), print "closed", stop reading stdin and
//                                     clear the timer: the process then ends by itself
//                                     once nothing is left open
//   {"cmd": "vanish"}                 exit at once, closing nothing (a client that is gone)
// stdout, one JSON object a line: {"event": "connecting" | "welcome" | "message" | "ack" |
// "connect_error" | "disconnect" | "closed" | "timeout", ...}.
import { createInterface } from "node:readline";
import { io } from "socket.io-client";
import { deadline, out, spec } from "./harness.mjs";

const timer = deadline(30000);

let lastSeq = null;
const seen = (seq) => {
  if (typeof seq === "number" && (lastSeq === null || seq > lastSeq)) lastSeq = seq;
};

const socket = io(spec.url + spec.namespace, {
  path: spec.path,
  transports: spec.transports,
  auth: (cb) => {
    const auth = { ...spec.auth };
    if (lastSeq !== null) auth.last_seq = lastSeq;
    out({ event: "connecting", auth });
    cb(auth);
  },
  reconnection: spec.reconnection ?? true,
  reconnectionDelay: spec.reconnection_delay_ms ?? 1000,
  reconnectionDelayMax: spec.reconnection_delay_max_ms ?? 5000,
  forceNew: true,
});

socket.on("welcome", (welcome) => {
  seen(welcome.last_seq);
  for (const m of welcome.history) seen(m.seq);
  out({ event: "welcome", data: welcome, transport: socket.io.engine.transport.name });
});
socket.on("message", (msg) => {
  seen(msg.seq);
  out({ event: "message", data: msg });
});
socket.on("connect_error", (err) => {
  out({ event: "connect_error", message: err.message, data: err.data ?? null });
});
socket.on("disconnect", (reason) => {
  // `active`: the client will reconnect by itself (false after "io server disconnect")
  out({ event: "disconnect", reason, active: socket.active });
});

const lines = createInterface({ input: process.stdin });
lines.on("line", async (line) => {
  const command = JSON.parse(line);
  if (command.cmd === "emit") {
    const ack = await socket.timeout(5000).emitWithAck(command.event, command.data);
    out({ event: "ack", data: ack });
  } else if (command.cmd === "close") {
    socket.close();
    clearTimeout(timer);
    lines.close();
    process.stdin.destroy();
    out({ event: "closed" });
  } else if (command.cmd === "vanish") {
    process.exit(0);
  }
});
