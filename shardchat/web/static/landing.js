/*
 * Landing page: create a room through POST /api/rooms and go to it.
 *
 * The API answers with the room's instance-prefixed path; private rooms also get an invite
 * token, which travels in the query string so the room page can store it and show the
 * shareable link.
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

  async function createRoom(name, isPrivate) {
    let response;
    try {
      response = await fetch("/api/rooms", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Accept": "application/json" },
        body: JSON.stringify({ name: name, private: isPrivate }),
      });
    } catch (err) {
      throw new Error("Could not reach the server. Check your connection and try again.");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (response.status !== 201 || !body || typeof body.path !== "string") {
      throw new Error(apiErrorText(response.status, body));
    }
    return body;
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
