// The yardstick: what a team writes when it drops Socket.IO for the plain `ws` library.
//
// It speaks just enough Engine.IO 4 / Socket.IO 5 framing for the load generator (websocket
// transport only): the Engine.IO open packet and ping/pong, a namespace CONNECT per room
// (`/room/<id>`), and `message` EVENTs with an ack id. A message is broadcast to every member
// of its namespace, sender included, with the same fields as shardchat's message (so frames
// have the same size); the frame is encoded once (one JSON.stringify, one Buffer) and that
// buffer is handed to every member's socket. Nothing is stored: no durability, no history,
// no dedup, no rate limits, no presence. That is the point: it is the fastest thing a team
// would hand-write, and the figure shardchat has to beat while doing all of those.
//
// Run: node bench/peers/raw_ws.js PORT   (ws resolved from the project's node_modules)
"use strict";
const crypto = require("crypto");
const http = require("http");
const path = require("path");
const { WebSocketServer } = require(path.join(__dirname, "..", "..", "node_modules", "ws"));

const PING_INTERVAL = 25000;
const PING_TIMEOUT = 20000;
const ROOM_NS = /^\/room\/[A-Za-z0-9_-]{1,64}$/;

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

// namespace -> {members: Set<socket>, seq: number, id: room id}
const rooms = new Map();

function join(ws, ns, auth) {
  let room = rooms.get(ns);
  if (!room) {
    room = { members: new Set(), seq: 0, id: ns.split("/").pop() };
    rooms.set(ns, room);
  }
  room.members.add(ws);
  ws.rooms.set(ns, {
    sid: crypto.randomBytes(15).toString("base64url"),
    name: String((auth && auth.name) || "anon").slice(0, 40),
    member: crypto.randomBytes(16).toString("base64url"),   // as long as shardchat's
  });
  ws.send(`40${ns},${JSON.stringify({ sid: ws.rooms.get(ns).sid })}`);
}

function leaveAll(ws) {
  for (const ns of ws.rooms.keys()) {
    const room = rooms.get(ns);
    if (!room) continue;
    room.members.delete(ws);
    if (room.members.size === 0) rooms.delete(ns);
  }
  ws.rooms.clear();
}

function onEvent(ws, ns, rest) {
  // rest: `<ack id>["message",{...}]` or `["message",{...}]`
  const bracket = rest.indexOf("[");
  if (bracket < 0) return;
  const ackId = rest.slice(0, bracket);
  let packet;
  try {
    packet = JSON.parse(rest.slice(bracket));
  } catch (_) {
    return;
  }
  const room = rooms.get(ns);
  const me = ws.rooms.get(ns);
  if (!room || !me || packet[0] !== "message") return;
  const data = packet[1] || {};
  if (typeof data.text !== "string") {
    if (ackId) ws.send(`43${ns},${ackId}[{"ok":false,"error":"bad_request","message":"text is required"}]`);
    return;
  }
  const seq = ++room.seq;
  const ts = Date.now();
  const msg = { seq, room: room.id, from: { sid: me.sid, name: me.name, member: me.member },
    text: data.text, ts, client_id: data.client_id === undefined ? null : data.client_id };
  const frame = Buffer.from(`42${ns},["message",${JSON.stringify(msg)}]`);  // encoded once
  for (const member of room.members) member.send(frame, { binary: false, compress: false });
  if (ackId) ws.send(`43${ns},${ackId}[{"ok":true,"seq":${seq},"ts":${ts}}]`);
}

function onPacket(ws, text) {
  if (text === "3") {  // pong
    ws.alive = true;
    return;
  }
  if (text[0] !== "4") return;
  const kind = text[1];
  const comma = text.indexOf(",");
  const ns = comma > 0 && text[2] === "/" ? text.slice(2, comma) : "/";
  const body = comma > 0 && text[2] === "/" ? text.slice(comma + 1) : text.slice(2);
  if (kind === "0") {
    if (!ROOM_NS.test(ns)) {
      ws.send(`44${ns},{"message":"Invalid namespace"}`);
      return;
    }
    let auth = {};
    try { auth = body ? JSON.parse(body) : {}; } catch (_) { auth = {}; }
    join(ws, ns, auth);
  } else if (kind === "2") {
    onEvent(ws, ns, body);
  } else if (kind === "1") {
    const room = rooms.get(ns);
    if (room) room.members.delete(ws);
    ws.rooms.delete(ns);
  }
}

const wss = new WebSocketServer({ server, path: "/socket.io/", perMessageDeflate: false,
  maxPayload: 1000000 });
wss.on("connection", (ws) => {
  ws.rooms = new Map();
  ws.alive = true;
  const sid = crypto.randomBytes(15).toString("base64url");
  ws.send(`0${JSON.stringify({ sid, upgrades: [], pingInterval: PING_INTERVAL,
    pingTimeout: PING_TIMEOUT, maxPayload: 1000000 })}`);
  ws.on("message", (data, isBinary) => {
    if (!isBinary) onPacket(ws, data.toString());
  });
  ws.on("close", () => leaveAll(ws));
  ws.on("error", () => ws.terminate());
});

// Engine.IO heartbeat: one timer for every connection, not one per socket.
setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.alive) {
      ws.terminate();
      continue;
    }
    ws.alive = false;
    ws.send("2");
  }
}, PING_INTERVAL).unref();

server.listen(port, "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
