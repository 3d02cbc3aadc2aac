// Drives the socket.io-client snippet of docs/protocol.md ("Following a room that moves"),
// which the Python test copies out of the doc, as it stands, into a module file of its own.
//
// Usage: node follow_move.mjs '<json spec>'
//   spec: {snippet,              path of that module (it exports joinRoom)
//          base, room, auth,     joinRoom's arguments (room: an /api/rooms answer)
//          count, text,          messages to send, one after the other, each awaited:
//                                "<text> <i>" with client_id "<text>-<i>"
//          pause_ms,             between two sends (a person typing), default 0
//          timeout_ms}
// Prints one JSON object per line: {"event": "message" | "ack" | "done" | "timeout", ...},
// each with "where": the namespace the client is on at that moment. "done" comes once every
// message of its own was acked and seen; then the script closes its socket and exits.
import { pathToFileURL } from "node:url";
import { deadline, out, spec } from "./harness.mjs";

const timer = deadline(30000);

const { joinRoom } = await import(pathToFileURL(spec.snippet).href);

let highest = 0;              // the newest seq seen
let wanted = Infinity;        // the newest seq acked to us, once every send is acked
let allSeen = null;           // resolves when highest >= wanted
const seenAll = new Promise((resolve) => { allSeen = resolve; });

const member = joinRoom(spec.base, spec.room, spec.auth, (m) => {
  out({ event: "message", data: m, where: member.where().namespace });
  highest = Math.max(highest, m.seq);
  if (highest >= wanted) allSeen();
});

let top = 0;
for (let i = 0; i < (spec.count ?? 0); i++) {
  const ack = await member.send(`${spec.text} ${i}`, `${spec.text}-${i}`);
  out({ event: "ack", index: i, data: ack, where: member.where().namespace });
  if (ack.ok) top = Math.max(top, ack.seq);
  if (spec.pause_ms) await new Promise((resolve) => setTimeout(resolve, spec.pause_ms));
}
wanted = top;
if (highest >= wanted) allSeen();
await seenAll;
out({ event: "done", where: member.where().namespace });
clearTimeout(timer);
member.close();
process.exit(0);
