/*
 * Room page: one chat room at /i<N>/room/<id>, talking Socket.IO to the node that owns it.
 *
 * The namespace is the page's own path and the Engine.IO path carries the same /i<N> prefix,
 * so the load balancer's per-instance rule sends both the page and its socket to one node.
 * When the room moves to another instance (a `moved` event, a `moved` refusal or ack), or
 * its instance cannot be reached at all (then GET /api/rooms/<id> says where it lives), the
 * page connects there with last_seq, resends what was not acked with the same client_id,
 * and puts the new path in the address bar.
 * All user text goes into the DOM through textContent: nothing a person types is parsed as HTML.
 */
(function () {
  "use strict";

  const ROOM_PATH_RE = /^\/i(\d+)\/room\/([A-Za-z0-9_-]{1,64})$/;
  const MAX_NAME = 40;
  const MAX_TEXT = 4000;
  const HISTORY_PAGE = 50;
  const GAP_PAGE = 100;             // recovery pages ask for the most; the server bounds them in bytes
  const GAP_RETRY_MS = 2000;
  const GROUP_GAP_MS = 5 * 60 * 1000;
  const TYPING_IDLE_MS = 2500;      // stop "typing" after this long without a keystroke
  const TYPING_STALE_MS = 6000;     // forget someone's "typing" if their stop never arrives
  const TYPING_REPEAT_MS = 3000;    // re-announce while typing continues (server drops < 2 s)
  const ACK_TIMEOUT_MS = 10000;
  const LOOKUP_MIN_MS = 2000;       // an unreachable instance: ask where the room lives, backing off
  const LOOKUP_MAX_MS = 30000;
  const JOIN_TIMEOUT_MS = 10000;    // a join the server never answers is dropped and retried
  const NEAR_BOTTOM_PX = 120;
  const LOAD_OLDER_PX = 80;
  const MEMBERS_PAGE = 100;         // members per page (the server allows up to 500)
  const LOAD_MEMBERS_PX = 200;      // ask for the next page this close to the list's end
  const DESKTOP = window.matchMedia("(min-width: 761px)");   // the list is always shown there

  const REFUSALS = {
    not_found: {
      title: "Room not found",
      text: "This room doesn't exist (or no longer exists) on its server. Check the link, or create a new room.",
    },
    forbidden: {
      title: "You need an invite",
      text: "This room is private — ask a member for the invite link.",
    },
    full: {
      title: "This room is full",
      text: "The room has reached its member limit. Try again when someone leaves.",
      retry: true,
    },
    draining: {
      title: "Server is restarting",
      text: "The server that hosts this room is restarting. We'll reconnect you automatically in a moment.",
      retry: true,
    },
    unavailable: {
      title: "Room is busy",
      text: "The server can't let you into this room right now. We'll try again in a moment.",
      retry: true,
    },
    wrong_instance: {
      title: "This link points to the wrong server",
      text: "The room's address doesn't match the server that answered. Ask for a fresh link to the room.",
    },
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    roomName: $("room-name-text"),
    lock: $("room-lock"),
    status: $("status"),
    statusText: $("status-text"),
    asYou: $("as-you"),
    changeName: $("change-name"),
    changeNamePanel: $("change-name-panel"),
    membersFoot: $("members-foot"),
    shareButton: $("share-button"),
    shareLabel: $("share-label"),
    sharePop: $("share-pop"),
    shareHint: $("share-hint"),
    shareLink: $("share-link"),
    shareCopy: $("share-copy"),
    membersToggle: $("members-toggle"),
    memberCountBadge: $("member-count-badge"),
    membersPanel: $("members-panel"),
    membersClose: $("members-close"),
    membersBackdrop: $("members-backdrop"),
    memberCount: $("member-count"),
    memberList: $("member-list"),
    membersMore: $("members-more"),
    scroller: $("scroller"),
    historyState: $("history-state"),
    messages: $("messages"),
    emptyState: $("empty-state"),
    jumpNew: $("jump-new"),
    typing: $("typing"),
    composer: $("composer"),
    input: $("composer-input"),
    composerError: $("composer-error"),
    nameDialog: $("name-dialog"),
    nameForm: $("name-form"),
    nameRoom: $("name-room"),
    nameInput: $("name-input"),
    nameError: $("name-error"),
    refusal: $("refusal"),
    refusalTitle: $("refusal-title"),
    refusalText: $("refusal-text"),
    refusalRetry: $("refusal-retry"),
  };

  // ---------------------------------------------------------------- address and storage

  const match = ROOM_PATH_RE.exec(window.location.pathname);
  if (!match) {
    showRefusal({ title: "Not a room address", text: "Room links look like /i1/room/abc. Check the link you followed." });
    return;
  }
  const roomId = match[2];
  // Where the room lives now: the page's own address at first, wherever it moves later.
  let here = placeOf(match[1]);
  // Per room, not per instance: an invite (like the member token) is valid wherever the
  // room lives. Invites kept by older pages under their instance are still read.
  const inviteKey = "shardchat.invite." + roomId;
  const oldInviteKey = "shardchat.invite." + match[1] + "." + roomId;

  function placeOf(instance) {
    const prefix = "/i" + instance;
    return { instance: instance, namespace: prefix + "/room/" + roomId, path: prefix + "/socket.io" };
  }

  /** The place a `moved` payload or a lookup names, if it is this room's and well formed. */
  function placeFrom(fields) {
    const m = fields && typeof fields.namespace === "string" && ROOM_PATH_RE.exec(fields.namespace);
    if (!m || m[2] !== roomId) return null;
    const place = placeOf(m[1]);
    return fields.socketio_path === place.path ? place : null;
  }

  function storageGet(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return null; }
  }
  function storageSet(key, value) {
    try { window.localStorage.setItem(key, value); } catch (e) { /* private mode: keep in memory */ }
  }

  /** The invite arrives once in ?invite=; keep it per room and take it out of the address bar. */
  function takeInvite() {
    const params = new URLSearchParams(window.location.search);
    const fromUrl = params.get("invite");
    if (fromUrl) {
      storageSet(inviteKey, fromUrl);
      params.delete("invite");
      const rest = params.toString();
      window.history.replaceState(null, "", window.location.pathname + (rest ? "?" + rest : "") + window.location.hash);
      return fromUrl;
    }
    return storageGet(inviteKey) || storageGet(oldInviteKey);
  }

  function randomId(bytes) {
    const a = new Uint8Array(bytes);
    window.crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // Who we are in this room is the member token the server gave us (welcome.you.token), not
  // our display name: anyone can pick a name. Passing it back on every (re)connect keeps our
  // member id, so resent messages are recognised as retries and our own messages stay ours
  // after a reload. Keyed by room id only: the token is valid on whichever node hosts the room.
  const tokenKey = "shardchat.member." + roomId;

  const state = {
    invite: takeInvite(),
    name: (storageGet("shardchat.name") || "").trim(),
    token: storageGet(tokenKey) || "",
    member: "",                // our public member id, from the welcome
    room: null,
    socket: null,
    mySids: new Set(),
    mySid: "",
    myName: "",
    joined: false,             // true between welcome and disconnect
    messages: new Map(),       // seq -> message
    pending: new Map(),        // client_id -> {text, status, error}
    members: new Map(),        // sid -> {sid, name, member}: the members loaded so far
    memberLis: new Map(),      // sid -> its <li> in the member list
    memberCount: 0,            // everyone in the room, as the server counts
    membersAfter: null,        // the `after` of the next members page
    membersDone: true,         // the list holds everyone (the walk reached the end)
    membersLoading: false,
    membersFailed: false,
    membersToken: 0,           // bumps on every welcome: stale pages are ignored
    typing: new Map(),         // sid -> {name, timer}
    highestSeq: 0,
    sentLastSeq: null,         // the last_seq of the current connection's auth
    gap: null,                 // {after, before}: a recovery still being paged in
    gapToken: 0,               // bumps on every welcome: stale gap pages are ignored
    lowestSeq: 0,
    atBeginning: false,
    loadingOlder: false,
    everConnected: false,
    retryTimer: null,
    retryDelay: 2000,
    lookupDelay: LOOKUP_MIN_MS,
    lookupAt: 0,
    lookingUp: false,
    joinTimer: null,
    typingSent: false,
    typingSentAt: 0,
    typingTimer: null,
    unseen: 0,
  };

  // ---------------------------------------------------------------- small helpers

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function nameLength(s) { return [...s].length; }

  /** Ours only when the server says our member sent it: names and client_ids can be copied,
   *  the member id cannot be claimed without the token only we were given. */
  function isOwn(msg) {
    return !!(state.member && msg.from && msg.from.member === state.member);
  }

  /** Same sender for grouping: the same member (two people may share a name). */
  function sameSender(a, b) {
    if (!a.from || !b.from) return false;
    if (a.from.member || b.from.member) return a.from.member === b.from.member;
    return a.from.name === b.from.name;   // messages stored before member ids existed
  }

  const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });
  const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: "long", month: "long", day: "numeric" });

  function dayLabel(ts) {
    const d = new Date(ts);
    const today = new Date();
    const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
    if (d.toDateString() === today.toDateString()) return "Today";
    if (d.toDateString() === yesterday.toDateString()) return "Yesterday";
    return dayFmt.format(d);
  }

  /** A stable hue per name so people are easy to tell apart at a glance. */
  function hueOf(name) {
    let h = 0;
    for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
    return h;
  }

  function initials(name) {
    const parts = name.trim().split(/\s+/).filter(Boolean);
    const first = parts[0] ? [...parts[0]][0] : "?";
    const second = parts.length > 1 ? [...parts[parts.length - 1]][0] : "";
    return (first + second).toUpperCase();
  }

  function avatar(name, className) {
    const a = make("span", "avatar " + (className || ""), initials(name));
    a.style.setProperty("--hue", String(hueOf(name)));
    a.setAttribute("aria-hidden", "true");
    return a;
  }

  // ---------------------------------------------------------------- status and overlays

  const STATUS_TEXT = {
    idle: "Not connected",
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    offline: "Offline",
  };

  function setStatus(s, text) {
    el.status.dataset.state = s;
    el.statusText.textContent = text || STATUS_TEXT[s];
    document.body.dataset.connection = s;
  }

  function showRefusal(info, onRetry) {
    el.refusalTitle.textContent = info.title;
    el.refusalText.textContent = info.text;
    el.refusalRetry.hidden = !onRetry;
    el.refusalRetry.onclick = onRetry || null;
    el.refusal.dataset.code = info.code || "";
    el.refusal.hidden = false;
  }

  function hideRefusal() { el.refusal.hidden = true; }

  function askName(errorText) {
    el.nameRoom.textContent = state.room ? state.room.name : "the room";
    el.nameInput.value = state.name;
    el.nameError.hidden = !errorText;
    el.nameError.textContent = errorText || "";
    el.nameDialog.hidden = false;
    el.nameInput.focus();
    el.nameInput.select();
  }

  el.nameForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = el.nameInput.value.trim();
    let problem = "";
    if (!name) problem = "Enter a name with at least one visible character.";
    else if (nameLength(name) > MAX_NAME) problem = "Use at most " + MAX_NAME + " characters.";
    else if (/[\u0000-\u001f\u007f]/.test(name)) problem = "Names can't contain control characters.";
    if (problem) {
      el.nameError.textContent = problem;
      el.nameError.hidden = false;
      el.nameInput.focus();
      return;
    }
    const changed = name !== state.name;
    state.name = name;
    storageSet("shardchat.name", name);
    el.nameDialog.hidden = true;
    if (!state.socket) connect();
    else if (changed || !state.socket.connected) reconnectNow();
  });

  el.changeName.addEventListener("click", () => askName(""));
  el.changeNamePanel.addEventListener("click", () => { setMembersOpen(false); askName(""); });

  // ---------------------------------------------------------------- the connection

  function connect() {
    setStatus("connecting");
    const socket = window.io(window.location.origin + here.namespace, {
      path: here.path,
      // socket.io-client shares one connection per host between namespaces, whatever their
      // path: after a move that would ask the old instance for the new namespace.
      forceNew: true,
      // A function runs before every (re)connect, so last_seq is always the newest we hold.
      auth: (cb) => cb(authPayload()),
      reconnectionDelay: 500,
      reconnectionDelayMax: 5000,
    });
    state.socket = socket;

    socket.on("connect", () => {
      setStatus("connecting", "Joining…");
      clearRetry();
    });
    socket.on("welcome", onWelcome);
    socket.on("message", onMessage);
    socket.on("presence", onPresence);
    socket.on("typing", onTyping);
    socket.on("moved", follow);
    socket.on("connect_error", onConnectError);
    socket.on("disconnect", onDisconnect);
    socket.io.on("reconnect_attempt", () => setStatus("reconnecting"));
    // A server on its way down may take the transport but never answer the join; without
    // this the page would wait forever (and keep that server's shutdown waiting too).
    socket.io.on("open", armJoinTimer);
  }

  function armJoinTimer() {
    window.clearTimeout(state.joinTimer);
    state.joinTimer = window.setTimeout(() => {
      if (state.joined || !state.socket) return;
      state.socket.disconnect();
      setStatus("reconnecting");
      retryLater();
    }, JOIN_TIMEOUT_MS);
  }

  function authPayload() {
    const auth = { name: state.name };
    if (state.invite) auth.invite = state.invite;
    if (state.token) auth.token = state.token;
    // While a recovery is still being paged in, ask again from below its hole.
    state.sentLastSeq = state.everConnected ? (state.gap ? state.gap.after : state.highestSeq) : null;
    if (state.sentLastSeq !== null) auth.last_seq = state.sentLastSeq;
    return auth;
  }

  function reconnectNow() {
    clearRetry();
    hideRefusal();
    setStatus("connecting");
    state.socket.disconnect();
    state.socket.connect();
  }

  function clearRetry() {
    if (state.retryTimer) window.clearTimeout(state.retryTimer);
    state.retryTimer = null;
  }

  /** A later retry for refusals that pass (draining, full): backs off up to 30 s. */
  function retryLater() {
    clearRetry();
    const delay = state.retryDelay;
    state.retryDelay = Math.min(state.retryDelay * 2, 30000);
    state.retryTimer = window.setTimeout(() => {
      state.retryTimer = null;
      if (!state.socket.connected) state.socket.connect();
    }, delay);
    return delay;
  }

  /** The room lives elsewhere now: leave this socket, connect there, recover from last_seq.
   *  Messages not acked yet are sent again after the welcome, with their client_id. */
  function follow(fields) {
    const next = placeFrom(fields);
    if (!next || next.namespace === here.namespace) return false;
    here = next;
    const old = state.socket;
    state.socket = null;
    if (old) {
      old.off();
      old.io.off();
      old.disconnect();
    }
    window.clearTimeout(state.joinTimer);
    clearRetry();
    state.joined = false;
    stopOwnTyping(false);
    clearTypingAll();
    markPendingWaiting();
    window.history.replaceState(null, "", here.namespace + window.location.search + window.location.hash);
    el.shareLink.value = shareUrl();
    connect();
    setStatus("reconnecting", "The room moved — reconnecting…");
    return true;
  }

  /** Ask any server where the room lives now. Resolves "moved" (and follows it), "here" (the
   *  current place is right), "gone" (no instance has the room) or "unknown" (no answer). */
  async function lookUp() {
    if (state.lookingUp) return "unknown";
    state.lookingUp = true;
    state.lookupAt = Date.now();
    try {
      const res = await window.fetch("/api/rooms/" + encodeURIComponent(roomId), { cache: "no-store" });
      if (res.status === 404) return "gone";
      if (!res.ok) return "unknown";
      return follow(await res.json()) ? "moved" : "here";
    } catch (e) {
      return "unknown";
    } finally {
      state.lookingUp = false;
    }
  }

  /** After a failed connection attempt: look the room up, at most every lookupDelay. */
  function lookUpNowAndThen() {
    if (Date.now() - state.lookupAt < state.lookupDelay) return;
    state.lookupDelay = Math.min(state.lookupDelay * 2, LOOKUP_MAX_MS);
    lookUp();
  }

  function onConnectError(err) {
    const code = err && err.data && err.data.code;
    if (!code) {
      // Transport trouble: the client retries by itself; meanwhile ask whether the room
      // still lives there (its instance may be gone).
      setStatus(state.everConnected ? "reconnecting" : "connecting",
        state.everConnected ? "Reconnecting…" : "Can't reach the server — retrying…");
      lookUpNowAndThen();
      return;
    }
    if (code === "moved") {
      follow(err.data);
      return;
    }
    if (code === "not_found") {
      // Not on this instance: it may live on another one now (adopted after a loss).
      lookUp().then((where) => { if (where !== "moved") refuse(err, code); });
      return;
    }
    refuse(err, code);
  }

  function refuse(err, code) {
    if (code === "bad_request") {
      setStatus("idle");
      askName((err.message && err.message !== "bad_request") ? err.message
        : "That display name can't be used. Pick 1 to 40 characters.");
      return;
    }
    const info = Object.assign({ code: code }, REFUSALS[code] || {
      title: "Couldn't join the room",
      text: (err.message || "The server refused the connection.") + " Try again in a moment.",
      retry: true,
    });
    if (code === "draining" || code === "unavailable") {
      const seconds = Math.round(retryLater() / 1000);
      setStatus("reconnecting", (code === "draining" ? "Server restarting" : "Room busy")
        + " — retrying in " + seconds + " s");
      if (!state.everConnected) showRefusal(info, reconnectNow);
      return;
    }
    setStatus("offline", info.title);
    showRefusal(info, info.retry ? reconnectNow : null);
  }

  function onDisconnect(reason) {
    state.joined = false;
    stopOwnTyping(false);
    clearTypingAll();
    if (reason === "io client disconnect") return;
    setStatus("reconnecting");
    markPendingWaiting();
    if (reason === "io server disconnect") {
      // The server closed this room's session (e.g. it is shutting down); come back later.
      retryLater();
    }
  }

  function onWelcome(w) {
    window.clearTimeout(state.joinTimer);
    state.everConnected = true;
    state.retryDelay = 2000;
    state.lookupDelay = LOOKUP_MIN_MS;
    hideRefusal();
    state.room = w.room;
    takeIdentity(w.you);
    state.mySids.add(w.you.sid);
    state.mySid = w.you.sid;
    state.myName = w.you.name;
    state.joined = true;
    showRoom(w.room, w.you);
    setMembers(w);
    const history = Array.isArray(w.history) ? w.history : [];
    state.gapToken += 1;
    state.gap = null;
    if (w.recovered) {
      for (const m of history) addMessage(m);
      // A recovery too large for one welcome carries its newest part and says "more": the
      // rest, down to what we had, is paged in backwards.
      if (w.more && history.length && state.sentLastSeq !== null
          && history[0].seq > state.sentLastSeq + 1) {
        state.gap = { after: state.sentLastSeq, before: history[0].seq };
      }
    } else {
      state.messages.clear();
      for (const m of history) addMessage(m);
      state.atBeginning = history.length === 0 || history[0].seq <= 1;
    }
    recomputeBounds();
    if (typeof w.last_seq === "number" && state.messages.size === 0) state.highestSeq = w.last_seq;
    setStatus("connected");
    render({ stickToBottom: !w.recovered || isNearBottom() });
    flushPending();
    if (state.gap) fillGap(state.gapToken);
    else maybeLoadOlder();
  }

  /** Page a recovery's hole in, newest first, until it meets the messages we already had. */
  function fillGap(token) {
    if (token !== state.gapToken || !state.gap || !state.joined) return;
    const gap = state.gap;
    state.socket.timeout(ACK_TIMEOUT_MS).emit("history", { before: gap.before, limit: GAP_PAGE }, (err, ack) => {
      if (token !== state.gapToken || !state.joined) return;  // a newer welcome took over
      if (err || !ack || !ack.ok || !Array.isArray(ack.messages)) {
        window.setTimeout(() => fillGap(token), GAP_RETRY_MS);
        return;
      }
      const near = isNearBottom();
      for (const m of ack.messages) addMessage(m);
      const oldest = ack.messages.length ? ack.messages[0].seq : 0;
      if (!oldest || oldest <= gap.after + 1) state.gap = null;
      else gap.before = oldest;
      recomputeBounds();
      render(near ? { stickToBottom: true } : {});  // the hole is above the newest messages
      if (state.gap) fillGap(token);
      else maybeLoadOlder();
    });
  }

  /** Keep the token for the next connect; a new one (the old was not accepted) replaces it. */
  function takeIdentity(you) {
    state.member = typeof you.member === "string" ? you.member : "";
    if (typeof you.token === "string" && you.token !== state.token) {
      state.token = you.token;
      storageSet(tokenKey, you.token);
    }
  }

  function showRoom(room, you) {
    el.roomName.textContent = room.name;
    document.title = room.name + " · shardchat";
    el.lock.toggleAttribute("hidden", !room.private);   // SVG elements have no .hidden
    el.changeName.textContent = you.name;
    el.changeNamePanel.textContent = you.name;
    el.membersFoot.hidden = false;
    el.asYou.hidden = false;
    el.shareButton.hidden = false;
    el.shareLabel.textContent = room.private ? "Copy invite link" : "Copy link";
    el.shareButton.setAttribute("aria-label", el.shareLabel.textContent);  // label hides on phones
    el.shareHint.textContent = room.private
      ? "This room is private: only people with this link can join. Share it with care."
      : "Anyone with this link can join.";
    el.shareLink.value = shareUrl();
  }

  function shareUrl() {
    const base = window.location.origin + here.namespace;
    if (state.room && state.room.private && state.invite) {
      return base + "?invite=" + encodeURIComponent(state.invite);
    }
    return base;
  }

  // ---------------------------------------------------------------- messages

  function addMessage(m) {
    if (!m || typeof m.seq !== "number") return false;
    if (typeof m.client_id === "string" && state.pending.has(m.client_id) && isOwn(m)) {
      state.pending.delete(m.client_id);
    }
    if (state.messages.has(m.seq)) return false;
    state.messages.set(m.seq, m);
    if (m.seq > state.highestSeq) state.highestSeq = m.seq;
    return true;
  }

  function recomputeBounds() {
    let low = 0;
    let high = state.highestSeq;
    for (const seq of state.messages.keys()) {
      if (!low || seq < low) low = seq;
      if (seq > high) high = seq;
    }
    state.lowestSeq = low;
    state.highestSeq = high;
    if (low === 1) state.atBeginning = true;
  }

  function onMessage(m) {
    const nearBottom = isNearBottom();
    if (!addMessage(m)) return;
    recomputeBounds();
    const own = isOwn(m);
    if (m.from) dropTyping(m.from.sid);
    if (!nearBottom && !own) {
      state.unseen += 1;
    }
    render({ stickToBottom: nearBottom || own });
  }

  function sendMessage(text) {
    const clientId = randomId(12);
    state.pending.set(clientId, { text: text, status: "sending", error: "", ts: Date.now() });
    render({ stickToBottom: true });
    if (state.joined) {
      emitPending(clientId);
    } else {
      markPendingWaiting();
    }
  }

  function emitPending(clientId) {
    const p = state.pending.get(clientId);
    if (!p || !state.joined) return;
    p.status = "sending";
    p.error = "";
    const sentOn = state.socket;
    sentOn.timeout(ACK_TIMEOUT_MS).emit("message", { text: p.text, client_id: clientId }, (err, ack) => {
      const still = state.pending.get(clientId);
      if (!still || sentOn !== state.socket) return;   // left behind by a move: sent again there
      if (ack && ack.error === "moved") {
        // The old instance did not store it: it goes out again where the room is now.
        still.status = "waiting";
        follow(ack);
        render({});
        return;
      }
      if (err) {
        // No answer in time: keep it; the next connection re-sends it (the server dedupes).
        still.status = "waiting";
        render({});
        return;
      }
      if (ack && ack.ok) {
        state.pending.delete(clientId);
        if (!state.messages.has(ack.seq) && typeof ack.seq === "number") {
          const me = { sid: state.mySid, name: state.myName, member: state.member };
          addMessage({ seq: ack.seq, room: roomId, from: me, text: still.text, ts: ack.ts, client_id: clientId });
          recomputeBounds();
        }
        render({ stickToBottom: true });
        return;
      }
      still.status = "failed";
      still.error = ackErrorText(ack);
      render({});
    });
  }

  function ackErrorText(ack) {
    const code = ack && ack.error;
    if (code === "rate_limited") return "You're sending messages too fast. Wait a moment, then retry.";
    if (code === "too_long") return (ack.message || "This message is too long.");
    if (code === "empty") return "This message is empty.";
    return (ack && ack.message) || "This message couldn't be sent.";
  }

  function flushPending() {
    for (const clientId of state.pending.keys()) emitPending(clientId);
    render({});
  }

  function markPendingWaiting() {
    let changed = false;
    for (const p of state.pending.values()) {
      if (p.status === "sending") { p.status = "waiting"; changed = true; }
    }
    if (changed) render({});
  }

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = el.input.value;
    if (!text.trim()) return;
    if (text.length > MAX_TEXT) {
      showComposerError("Messages can be at most " + MAX_TEXT + " characters; this one has " + text.length + ".");
      return;
    }
    hideComposerError();
    stopOwnTyping(true);
    sendMessage(text);
    el.input.value = "";
    autosize();
    el.input.focus();
  });

  el.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      el.composer.requestSubmit();
    }
  });

  el.input.addEventListener("input", () => {
    autosize();
    hideComposerError();
    if (el.input.value.trim()) noteOwnTyping();
    else stopOwnTyping(true);
  });

  function autosize() {
    el.input.style.height = "auto";
    el.input.style.height = Math.min(el.input.scrollHeight, 160) + "px";
  }

  function showComposerError(text) {
    el.composerError.textContent = text;
    el.composerError.hidden = false;
  }
  function hideComposerError() { el.composerError.hidden = true; }

  // ---------------------------------------------------------------- rendering the list

  const rendered = new Map();   // key -> element, reused across renders

  function messageElement(m, own, continued) {
    const key = "m" + m.seq;
    let li = rendered.get(key);
    if (!li) {
      li = make("li", "msg");
      li.dataset.seq = String(m.seq);
      const name = (m.from && m.from.name) || "Someone";
      li.append(avatar(name, "msg-avatar"));
      const body = make("div", "msg-body");
      const meta = make("div", "msg-meta");
      meta.append(make("span", "msg-author", name));
      const time = make("time", "msg-time", timeFmt.format(new Date(m.ts)));
      time.dateTime = new Date(m.ts).toISOString();
      time.title = fullFmt.format(new Date(m.ts));
      meta.append(time);
      body.append(meta, make("div", "msg-text", m.text));
      li.append(body);
      li.title = fullFmt.format(new Date(m.ts));
      rendered.set(key, li);
    }
    li.classList.toggle("own", own);
    li.classList.toggle("continued", continued);
    return li;
  }

  function pendingElement(clientId, p, continued) {
    const key = "p" + clientId;
    let li = rendered.get(key);
    if (!li) {
      li = make("li", "msg own pending");
      li.dataset.clientId = clientId;
      li.append(avatar(state.name || "?", "msg-avatar"));
      const body = make("div", "msg-body");
      const meta = make("div", "msg-meta");
      meta.append(make("span", "msg-author", state.name || "You"));
      body.append(meta, make("div", "msg-text", p.text), make("div", "msg-state"));
      li.append(body);
      rendered.set(key, li);
    }
    li.classList.toggle("continued", continued);
    li.classList.toggle("failed", p.status === "failed");
    const stateLine = li.querySelector(".msg-state");
    stateLine.replaceChildren();
    if (p.status === "failed") {
      stateLine.append(make("span", "", p.error + " "));
      const retry = make("button", "link-button", "Retry");
      retry.type = "button";
      retry.addEventListener("click", () => emitPending(clientId));
      const discard = make("button", "link-button", "Discard");
      discard.type = "button";
      discard.addEventListener("click", () => { state.pending.delete(clientId); render({}); });
      stateLine.append(retry, document.createTextNode(" · "), discard);
    } else {
      stateLine.textContent = p.status === "waiting" ? "Waiting for connection…" : "Sending…";
    }
    return li;
  }

  function dayElement(ts) {
    const label = dayLabel(ts);
    const key = "d" + label;
    let li = rendered.get(key);
    if (!li) {
      li = make("li", "day-divider");
      li.append(make("span", "", label));
      rendered.set(key, li);
    }
    return li;
  }

  function render(opts) {
    const before = { height: el.scroller.scrollHeight, top: el.scroller.scrollTop };
    const seqs = Array.from(state.messages.keys()).sort((a, b) => a - b);
    const frag = document.createDocumentFragment();
    const used = new Set();
    let prev = null;
    let prevDay = "";
    for (const seq of seqs) {
      const m = state.messages.get(seq);
      const day = dayLabel(m.ts);
      if (day !== prevDay) {
        const d = dayElement(m.ts);
        frag.append(d);
        used.add("d" + day);
        prevDay = day;
        prev = null;
      }
      const own = isOwn(m);
      const continued = !!prev && sameSender(prev, m) && isOwn(prev) === own
        && m.ts - prev.ts < GROUP_GAP_MS;
      frag.append(messageElement(m, own, continued));
      used.add("m" + seq);
      prev = m;
    }
    let lastOwn = prev ? isOwn(prev) : false;
    for (const [clientId, p] of state.pending) {
      frag.append(pendingElement(clientId, p, lastOwn));
      used.add("p" + clientId);
      lastOwn = true;
    }
    for (const key of rendered.keys()) if (!used.has(key)) rendered.delete(key);
    el.messages.replaceChildren(frag);
    el.emptyState.hidden = seqs.length > 0 || state.pending.size > 0 || !state.everConnected;
    updateHistoryEdge();

    if (opts.keepTopAnchor) {
      el.scroller.scrollTop = before.top + (el.scroller.scrollHeight - before.height);
    } else if (opts.stickToBottom) {
      scrollToBottom();
    }
    updateJump();
  }

  function updateHistoryEdge() {
    let text = "";
    if (state.loadingOlder) text = "Loading earlier messages…";
    else if (state.atBeginning && state.messages.size > 0) text = "This is the beginning of the room.";
    el.historyState.textContent = text;
  }

  function isNearBottom() {
    const s = el.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < NEAR_BOTTOM_PX;
  }

  function scrollToBottom() {
    el.scroller.scrollTop = el.scroller.scrollHeight;
    state.unseen = 0;
  }

  function updateJump() {
    if (isNearBottom()) state.unseen = 0;
    el.jumpNew.hidden = state.unseen === 0;
    el.jumpNew.textContent = state.unseen === 1 ? "1 new message ↓" : state.unseen + " new messages ↓";
  }

  el.jumpNew.addEventListener("click", () => { scrollToBottom(); updateJump(); });

  // ---------------------------------------------------------------- scroll-back

  el.scroller.addEventListener("scroll", () => {
    updateJump();
    maybeLoadOlder();
  }, { passive: true });

  function maybeLoadOlder() {
    if (state.loadingOlder || state.atBeginning || !state.lowestSeq) return;
    if (!state.joined) return;
    if (el.scroller.scrollTop > LOAD_OLDER_PX) return;
    loadOlder();
  }

  function loadOlder() {
    state.loadingOlder = true;
    updateHistoryEdge();
    const before = state.lowestSeq;
    state.socket.timeout(ACK_TIMEOUT_MS).emit("history", { before: before, limit: HISTORY_PAGE }, (err, ack) => {
      state.loadingOlder = false;
      if (err || !ack || !ack.ok || !Array.isArray(ack.messages)) {
        el.historyState.textContent = "Couldn't load earlier messages. Scroll up to try again.";
        return;
      }
      for (const m of ack.messages) addMessage(m);
      if (ack.messages.length === 0) state.atBeginning = true;
      recomputeBounds();
      render({ keepTopAnchor: true });
      // A short page may leave the top still in view: keep filling, one page per answer.
      if (state.lowestSeq < before) maybeLoadOlder();
    });
  }

  // ---------------------------------------------------------------- members

  // A large room's member list is loaded lazily: the welcome carries the room's first
  // members (in join order) and member_count; the rest comes page by page (`members`) as
  // the list is scrolled to its end while it is shown. The count always comes from the
  // server (welcome, presence), never from what is loaded. Joins are added to the list once
  // the walk has reached the end (before that, the walk itself brings them: they joined
  // last); leaves are removed whenever they come.

  function setMembers(w) {
    const list = Array.isArray(w.members) ? w.members : [];
    state.members.clear();
    state.memberLis.clear();
    el.memberList.replaceChildren(el.membersMore);
    state.memberCount = typeof w.member_count === "number" ? w.member_count : list.length;
    state.membersToken += 1;            // pages asked for on an older connection are ignored
    state.membersLoading = false;
    state.membersFailed = false;
    state.membersAfter = list.length ? list[list.length - 1].sid : null;
    state.membersDone = list.length >= state.memberCount;
    addMember({ sid: w.you.sid, name: w.you.name, member: w.you.member });
    for (const m of list) addMember(m);
    renderMemberCount();
    maybeLoadMembers();
  }

  function addMember(m) {
    if (!m || typeof m.sid !== "string" || typeof m.name !== "string") return;
    state.members.set(m.sid, m);
    let li = state.memberLis.get(m.sid);
    if (li) {
      li.querySelector(".member-name").textContent = m.name;
      return;
    }
    li = make("li", "member");
    li.dataset.sid = m.sid;
    li.append(avatar(m.name, "member-avatar"));
    li.append(make("span", "member-name", m.name));
    const mine = state.mySids.has(m.sid);
    if (mine) li.append(make("span", "member-you", "you"));
    state.memberLis.set(m.sid, li);
    // you first, then everyone in join order; the "more" line stays last
    el.memberList.insertBefore(li, mine ? el.memberList.firstChild : el.membersMore);
  }

  function removeMember(sid) {
    state.members.delete(sid);
    const li = state.memberLis.get(sid);
    if (li) li.remove();
    state.memberLis.delete(sid);
    dropTyping(sid);
  }

  function onPresence(p) {
    if (!p) return;
    if (p.event === "batch") {
      for (const m of (Array.isArray(p.left) ? p.left : [])) if (m) removeMember(m.sid);
      if (state.membersDone) for (const m of (Array.isArray(p.joined) ? p.joined : [])) addMember(m);
    } else if (p.member) {
      if (p.event === "join" && state.membersDone) addMember(p.member);
      if (p.event === "leave") removeMember(p.member.sid);
    }
    if (typeof p.count === "number") state.memberCount = p.count;
    renderMemberCount();
  }

  function renderMemberCount() {
    const count = String(state.memberCount);
    el.memberCount.textContent = count;
    el.memberCountBadge.textContent = count;
    el.membersToggle.title = state.memberCount === 1 ? "1 member" : state.memberCount + " members";
    el.membersMore.hidden = state.membersDone;
    el.membersMore.textContent = state.membersFailed
      ? "Couldn't load more members. Scroll to try again."
      : "Loading more members…";
  }

  function membersShown() {
    return document.body.classList.contains("members-open") || DESKTOP.matches;
  }

  /** The next page, when the list is shown and scrolled (near) to its end. */
  function maybeLoadMembers() {
    if (!state.joined || state.membersDone || state.membersLoading || !membersShown()) return;
    const list = el.memberList;
    if (list.scrollHeight - list.scrollTop - list.clientHeight > LOAD_MEMBERS_PX) return;
    const token = state.membersToken;
    state.membersLoading = true;
    state.socket.timeout(ACK_TIMEOUT_MS).emit("members", { after: state.membersAfter, limit: MEMBERS_PAGE }, (err, ack) => {
      if (token !== state.membersToken) return;   // a newer welcome rebuilt the list
      state.membersLoading = false;
      if (err || !ack || !ack.ok || !Array.isArray(ack.members)) {
        if (ack && ack.error === "bad_request") {
          state.membersAfter = null;             // our place is forgotten: walk again
        } else {
          state.membersFailed = true;
          renderMemberCount();
          return;
        }
      } else {
        state.membersFailed = false;
        for (const m of ack.members) addMember(m);
        state.membersAfter = ack.next;
        state.membersDone = ack.next === null;
      }
      renderMemberCount();
      maybeLoadMembers();                       // a short page may leave the end in view
    });
  }

  el.memberList.addEventListener("scroll", maybeLoadMembers, { passive: true });

  function setMembersOpen(open) {
    document.body.classList.toggle("members-open", open);
    el.membersToggle.setAttribute("aria-expanded", open ? "true" : "false");
    el.membersBackdrop.hidden = !open;
    if (open) maybeLoadMembers();
  }

  el.membersToggle.addEventListener("click", () => {
    setMembersOpen(!document.body.classList.contains("members-open"));
  });
  el.membersClose.addEventListener("click", () => setMembersOpen(false));
  el.membersBackdrop.addEventListener("click", () => setMembersOpen(false));
  DESKTOP.addEventListener("change", maybeLoadMembers);

  // ---------------------------------------------------------------- typing

  function noteOwnTyping() {
    if (!state.joined) return;
    const now = Date.now();
    // Repeat "typing" while keys keep coming, so others' stale-timeout never fires mid-sentence.
    if (!state.typingSent || now - state.typingSentAt > TYPING_REPEAT_MS) {
      state.typingSent = true;
      state.typingSentAt = now;
      state.socket.emit("typing", { typing: true });
    }
    window.clearTimeout(state.typingTimer);
    state.typingTimer = window.setTimeout(() => stopOwnTyping(true), TYPING_IDLE_MS);
  }

  function stopOwnTyping(tell) {
    window.clearTimeout(state.typingTimer);
    state.typingTimer = null;
    if (state.typingSent && tell && state.socket && state.socket.connected) {
      state.socket.emit("typing", { typing: false });
    }
    state.typingSent = false;
  }

  function onTyping(t) {
    if (!t || !t.sid || state.mySids.has(t.sid)) return;
    if (t.typing) {
      const old = state.typing.get(t.sid);
      if (old) window.clearTimeout(old.timer);
      const timer = window.setTimeout(() => dropTyping(t.sid), TYPING_STALE_MS);
      state.typing.set(t.sid, { name: t.name, timer: timer });
      renderTyping();
    } else {
      dropTyping(t.sid);
    }
  }

  function dropTyping(sid) {
    const t = state.typing.get(sid);
    if (!t) return;
    window.clearTimeout(t.timer);
    state.typing.delete(sid);
    renderTyping();
  }

  function clearTypingAll() {
    for (const t of state.typing.values()) window.clearTimeout(t.timer);
    state.typing.clear();
    renderTyping();
  }

  function renderTyping() {
    const names = Array.from(state.typing.values(), (t) => t.name);
    let text = "";
    if (names.length === 1) text = names[0] + " is typing…";
    else if (names.length === 2) text = names[0] + " and " + names[1] + " are typing…";
    else if (names.length > 2) text = names.length + " people are typing…";
    el.typing.textContent = text;
    el.typing.classList.toggle("active", names.length > 0);
  }

  // ---------------------------------------------------------------- share link

  el.shareButton.addEventListener("click", async () => {
    const open = el.sharePop.hidden;
    el.sharePop.hidden = !open;
    if (open) {
      el.shareLink.value = shareUrl();
      await copyShareLink();
    }
  });

  el.shareCopy.addEventListener("click", copyShareLink);

  document.addEventListener("click", (event) => {
    if (el.sharePop.hidden) return;
    if (el.sharePop.contains(event.target) || el.shareButton.contains(event.target)) return;
    el.sharePop.hidden = true;
  });

  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    el.sharePop.hidden = true;
    setMembersOpen(false);
  });

  async function copyShareLink() {
    const link = shareUrl();
    el.shareLink.value = link;
    let copied = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(link);
        copied = true;
      }
    } catch (e) {
      copied = false;
    }
    if (!copied) {
      el.shareLink.focus();
      el.shareLink.select();
      try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
    }
    el.shareCopy.textContent = copied ? "Copied!" : "Select & copy";
    window.setTimeout(() => { el.shareCopy.textContent = "Copy"; }, 2000);
  }

  // ---------------------------------------------------------------- start

  window.addEventListener("offline", () => setStatus("offline", "Offline — waiting for the network"));

  if (typeof window.io !== "function") {
    showRefusal({ title: "Couldn't load the chat client", text: "Part of this page failed to load. Reload to try again." },
      () => window.location.reload());
    return;
  }
  if (state.name) {
    connect();
  } else {
    askName("");
  }
})();
