// Node socket.io 4 doing what shardchat's room does on the wire: one namespace per room
// (a dynamic namespace matching /room/<id>), "message" with an ack is broadcast to every
// member of the namespace, sender included, with the same fields as shardchat's message.
// A joiner gets a `welcome` as shardchat's contract has it for large rooms: the room, itself,
// the first WELCOME_MEMBERS members in join order, member_count, last_seq and an empty history
// (nothing is stored here); nobody is told of joins or leaves (no `presence`).
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
  if (req.url === "/stats") {  // the leave scenario watches a room empty through this
    let inRooms = 0;
    for (const here of members.values()) inRooms += here.size;
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(JSON.stringify({ members: inRooms, connections: io.engine.clientsCount }));
    return;
  }
  res.writeHead(404);
  res.end();
});
const io = new Server(server, { cors: { origin: "*" } });
const seqs = new Map();
const members = new Map();  // namespace name -> Map(socket id -> {sid, name, member}), join order
const WELCOME_MEMBERS = 100;

io.of(/^\/room\/[A-Za-z0-9_-]{1,64}$/).on("connection", (socket) => {
  const nsp = socket.nsp;
  const name = String((socket.handshake.auth || {}).name || "anon").slice(0, 40);
  const member = crypto.randomBytes(16).toString("base64url");   // as long as shardchat's
  const room = nsp.name.split("/").pop();
  let here = members.get(nsp.name);
  if (!here) {
    here = new Map();
    members.set(nsp.name, here);
  }
  const you = { sid: socket.id, name, member };
  here.set(socket.id, you);
  const listed = [];
  for (const m of here.values()) {
    if (listed.length >= WELCOME_MEMBERS) break;
    listed.push(m);
  }
  socket.emit("welcome", { room: { id: room, name: "bench room", private: false }, you,
    members: listed, member_count: here.size, last_seq: seqs.get(nsp.name) || 0, history: [],
    recovered: false });
  socket.on("disconnect", () => {
    here.delete(socket.id);
    if (here.size === 0) members.delete(nsp.name);
  });
  socket.on("message", (data, ack) => {
    if (!data || typeof data.text !== "string") {
      if (typeof ack === "function") ack({ ok: false, error: "bad_request", message: "text is required" });
      return;
    }
    const seq = (seqs.get(nsp.name) || 0) + 1;
    seqs.set(nsp.name, seq);
    const ts = Date.now();
    const msg = { seq, room, from: { sid: socket.id, name, member },
      text: data.text, ts, client_id: data.client_id === undefined ? null : data.client_id };
    nsp.emit("message", msg);
    if (typeof ack === "function") ack({ ok: true, seq, ts });
  });
});

server.listen(port, "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
