// What every test script under tests/js shares: its spec (the JSON the Python test passes as
// the first argument), one JSON object a line on stdout, and a deadline after which the
// script prints {"event": "timeout"} and exits 1 by itself, so no test waits on a hung client.
import { io } from "socket.io-client";

export const spec = JSON.parse(process.argv[2]);
export const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

/** The script's deadline: spec.timeout_ms, or ``defaultMs``; clear it to end normally. */
export function deadline(defaultMs) {
  return setTimeout(() => {
    out({ event: "timeout" });
    process.exit(1);
  }, spec.timeout_ms ?? defaultMs);
}

/** One connection to the spec's room that does not reconnect: a refusal stays a refusal. */
export function connectOnce() {
  return io(spec.url + spec.namespace, {
    path: spec.path,
    transports: spec.transports,
    auth: spec.auth,
    reconnection: false,
    forceNew: true,
  });
}
