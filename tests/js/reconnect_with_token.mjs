// A client that keeps its member token, as every client should: the official
// socket.io-client with `auth` as a function, so each (re)connect sends the newest token.
//
// Usage: node reconnect_with_token.mjs '<json spec>'
//   spec: {url, namespace, path, transports, auth,   auth: name (and invite) to join with
//          retry: {text, client_id},                 sent after the first welcome, then the
//                                                    connection is cut and, after the
//                                                    reconnect's welcome, sent again
//          timeout_ms}
// Prints one JSON object per line: {"event": "auth" | "welcome" | "ack" | "disconnect" |
// "done" | "timeout", ...}. After "done" it closes the socket and the caller ends the process.
import { io } from "socket.io-client";
import { deadline, out, spec } from "./harness.mjs";

const timer = deadline(15000);

let token = null;   // welcome.you.token, kept for the next connect
let welcomes = 0;

const socket = io(spec.url + spec.namespace, {
  path: spec.path,
  transports: spec.transports,
  auth: (cb) => {
    const auth = { ...spec.auth };
    if (token) auth.token = token;
    out({ event: "auth", data: auth });
    cb(auth);
  },
  reconnectionDelay: 100,
  reconnectionDelayMax: 500,
  forceNew: true,
});

socket.on("connect_error", (err) => out({ event: "connect_error", message: err.message }));
socket.on("disconnect", (reason) => out({ event: "disconnect", reason }));

socket.on("welcome", async (welcome) => {
  welcomes += 1;
  token = welcome.you.token;
  out({ event: "welcome", data: welcome });
  const ack = await socket.timeout(5000).emitWithAck("message", spec.retry);
  out({ event: "ack", data: ack });
  if (welcomes === 1) {
    socket.io.engine.close();   // the network drops: the client reconnects by itself
    return;
  }
  out({ event: "done" });
  clearTimeout(timer);
  socket.close();
});
