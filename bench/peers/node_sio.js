// Node socket.io 4 doing what shardchat's room does on the wire: one namespace per room
// (a dynamic namespace matching /room/<id>), "message" with an ack is broadcast to every
// member of the namespace, sender included, with the same fields as shardchat's message.
// Run: node bench/peers/node_sio.js PORT   (socket.io resolved from the project's node_modules)
"use strict";
const crypto = require("crypto");
const http = require("http");
const path = require("path");
const { Server } = require(path.join(__dirname, "..", "..", "node_modules", "socket.io"));

const port = Number(process.argv[2]);
const server = http.createServer((req, res) => {
  if (req.url === "/healthz") {
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end('{"status":"ok"}');
    return;
  }
  res.writeHead(404);
  res.end();
});
const io = new Server(server, { cors: { origin: "*" } });
const seqs = new Map();

io.of(/^\/room\/[A-Za-z0-9_-]{1,64}$/).on("connection", (socket) => {
  const nsp = socket.nsp;
  const name = String((socket.handshake.auth || {}).name || "anon").slice(0, 40);
  const member = crypto.randomBytes(16).toString("base64url");   // as long as shardchat's
  socket.on("message", (data, ack) => {
    if (!data || typeof data.text !== "string") {
      if (typeof ack === "function") ack({ ok: false, error: "bad_request", message: "text is required" });
      return;
    }
    const seq = (seqs.get(nsp.name) || 0) + 1;
    seqs.set(nsp.name, seq);
    const ts = Date.now();
    const msg = { seq, room: nsp.name.split("/").pop(), from: { sid: socket.id, name, member },
      text: data.text, ts, client_id: data.client_id === undefined ? null : data.client_id };
    nsp.emit("message", msg);
    if (typeof ack === "function") ack({ ok: true, seq, ts });
  });
});

server.listen(port, "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
