/*
 * Landing page: create a room through POST /api/rooms and go to it.
 *
 * The API answers with the room's instance-prefixed path; private rooms also get an invite
 * token, which travels in the query string so the room page can store it and show the
 * shareable link.
 *
 * A creation that fails on the way (no answer, or 502/503/504 from a load balancer whose
 * target just died) is retried a few times with backoff, always with the same
 * Idempotency-Key: the server answers a retry with the room the first try may already have
 * made, so a retry never makes a second room. Each click of "Create" is a new key.
 */
(function () {
  "use strict";

  const form = document.getElementById("create-form");
  const nameInput = document.getElementById("room-name");
  const privateInput = document.getElementById("room-private");
  const errorBox = document.getElementById("create-error");
  const button = document.getElementById("create-button");

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = false;
    nameInput.setAttribute("aria-invalid", "true");
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
    nameInput.removeAttribute("aria-invalid");
  }

  function setBusy(busy) {
    button.disabled = busy;
    button.classList.toggle("is-busy", busy);
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  const RETRY_DELAYS_MS = [400, 1200, 3000];  // after the 1st, 2nd, 3rd failed try
  const RETRY_STATUSES = [502, 503, 504];

  /** 128 random bits in base64url: unguessable, since the key stands for the room. */
  function newIdempotencyKey() {
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    let text = "";
    bytes.forEach(function (b) { text += String.fromCharCode(b); });
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function wait(ms) {
    return new Promise(function (resolve) { window.setTimeout(resolve, ms); });
  }

  /** A sentence for a person from an API error body, whatever shape it has. */
  function apiErrorText(status, body) {
    if (body && typeof body.message === "string" && body.message) return body.message;
    if (status === 503) return "No chat server can take a new room right now. Try again in a moment.";
    if (status === 413) return "That request was too large. Use a shorter room name.";
    return "The room could not be created (error " + status + "). Try again.";
  }

  /** Where to go after creating: the room path, plus the invite for private rooms. */
  function roomHref(room) {
    if (room.private && room.invite) {
      return room.path + "?invite=" + encodeURIComponent(room.invite);
    }
    return room.path;
  }

  /** One try: resolves to {room} on success, {retry, error} otherwise. */
  async function tryCreate(name, isPrivate, key) {
    let response;
    try {
      response = await fetch("/api/rooms", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Accept": "application/json",
                   "Idempotency-Key": key },
        body: JSON.stringify({ name: name, private: isPrivate }),
      });
    } catch (err) {
      return { retry: true,
               error: "Could not reach the server. Check your connection and try again." };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (response.status === 201 && body && typeof body.path === "string") {
      return { room: body };
    }
    return { retry: RETRY_STATUSES.indexOf(response.status) !== -1,
             error: apiErrorText(response.status, body) };
  }

  async function createRoom(name, isPrivate) {
    const key = newIdempotencyKey();
    for (let attempt = 0; ; attempt++) {
      const outcome = await tryCreate(name, isPrivate, key);
      if (outcome.room) return outcome.room;
      if (!outcome.retry || attempt >= RETRY_DELAYS_MS.length) throw new Error(outcome.error);
      await wait(RETRY_DELAYS_MS[attempt] * (0.75 + Math.random() / 2));
    }
  }

  // Only a blank name is caught here; every other rule (length, ...) is the API's to state,
  // so the page never disagrees with the server about what is allowed.
  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    clearError();
    const name = nameInput.value.trim();
    if (!name) {
      showError("Give the room a name so people know where they are.");
      nameInput.focus();
      return;
    }
    setBusy(true);
    try {
      const room = await createRoom(name, privateInput.checked);
      window.location.assign(roomHref(room));
    } catch (err) {
      showError(err.message);
      setBusy(false);
      nameInput.focus();
    }
  });

  nameInput.addEventListener("input", function () {
    if (!errorBox.hidden) clearError();
  });
})();
