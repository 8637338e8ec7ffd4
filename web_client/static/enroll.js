// Enrolment kiosk: consent → details → guided capture → passphrase → result.
// The camera is only requested after consent and details (docs/protocol.md, Enrolment).
import {
  Terminal, readFragment, setState, showScreen, setText, drawBoxes, staleClearer, clearOverlay,
} from "./terminal.js";

const HINTS = {
  closer: "Come a little closer",
  farther: "Move back a little",
  move_to_centre: "Move to the middle of the picture",
  upside_down: "The camera picture is upside down: please ask staff for help",
  more_light: "More light please",
  less_light: "Too bright: move out of direct light",
  look_at_camera: "Look at the camera",
  hold_still: "Hold still",
  one_person: "Only one person please",
  no_face: "We can't see a face yet",
  ok: "Great, keep looking at the camera",
};

const DECLINES = {
  spoof: "Please show your real face, not a photo or screen.",
  timeout: "We could not capture your face in time. Please try again.",
  conflict: "That account id is already taken. Choose another.",
  already_enrolled: "You are already enrolled with this phone number.",
  ambiguous: "We cannot enrol this face today. Please try again tomorrow or ask staff.",
  unavailable: "The service is unavailable right now. Nothing was stored.",
  enrolment_unknown: "We could not confirm whether your enrolment was saved. Please ask staff before trying again.",
  terminal_revoked: "This kiosk is no longer allowed to enrol. Nothing was stored.",
};

const fragment = readFragment();
const video = document.getElementById("preview");
const canvas = document.getElementById("overlay");
const clearLater = staleClearer(canvas);
let terminal = null;
let details = null;
let finished = false;
let starting = false; // start_enroll was sent and the server has not started capturing yet
let inSession = false; // the server runs an enrolment for this page (capturing or later)

// Why the server refused to start an enrolment (an "error" before "capturing").
const REFUSALS = {
  rate_limited: "Too many enrolments were started here. Please try again later.",
  unavailable: "The service is unavailable right now. Please try again later.",
  busy: "An enrolment is already running on this terminal.",
};

// The server's phone rule (session/_store_lua.py): spaces, dashes, dots and brackets are
// ignored, then 6 to 20 digits with an optional leading +.
const PHONE = /^\+?[0-9]{6,20}$/;

function phoneValid(phone) {
  return PHONE.test(phone.replace(/[\s\-().]/g, ""));
}

/** Empty both passphrase fields: a typed passphrase never stays in the page. */
function clearPassphrases() {
  document.getElementById("pass1").value = "";
  document.getElementById("pass2").value = "";
}

/** Turn the camera off and drop the connection (no server session is running). */
function stopTerminal() {
  if (terminal) terminal.stop();
  terminal = null;
  starting = false;
  inSession = false;
  clearOverlay(canvas);
  setText("conn", "Camera off");
}

/** Back to the details screen (camera off), saying why. */
function backToDetails(text) {
  stopTerminal();
  setState("details");
  showScreen("screen-details");
  const err = document.getElementById("details-error");
  err.textContent = text;
  err.hidden = !text;
  document.getElementById("start").focus();
}

function fail(text) {
  clearPassphrases();
  setState("error");
  showScreen("screen-error");
  setText("error-detail", text);
  setText("conn", "Not connected");
}

function showResult(ok, title, detail) {
  finished = true;
  starting = false;
  inSession = false;
  clearPassphrases();
  showScreen("screen-result");
  const el = document.getElementById("result-title");
  el.textContent = title;
  el.className = "result " + (ok ? "ok" : "bad");
  setText("result-detail", detail);
  if (terminal) terminal.stop(); // release the camera as soon as we are done
  clearOverlay(canvas);
  setText("conn", "Camera off");
  document.getElementById("again").focus();
}

const handlers = {
  faces(msg) {
    const items = (msg.boxes || []).map((box) => ({ box, color: "#38bdf8" }));
    drawBoxes(canvas, video, msg.width, msg.height, items);
    clearLater();
  },
  enroll_feedback(msg) {
    const hint = document.getElementById("hint");
    hint.textContent = HINTS[msg.hint] || msg.hint;
    hint.dataset.hint = msg.hint; // for kiosk automation and tests
    document.getElementById("progress").value = Number(msg.progress) || 0;
  },
  state(msg) {
    if (msg.state === "capturing") {
      starting = false;
      inSession = true;
      setState("capturing");
      showScreen("screen-capture");
      setText("hint", HINTS.look_at_camera);
    } else if (msg.state === "passphrase") {
      // The capture is over: the camera goes off while the person types.
      terminal.closeCamera();
      clearOverlay(canvas);
      setText("conn", "Connected · camera off");
      setState("passphrase");
      showScreen("screen-passphrase");
      clearPassphrases();
      document.getElementById("finish").disabled = false;
      document.getElementById("pass1").focus();
    } else if (msg.state === "cancelled") {
      setState("cancelled");
      showResult(false, "Cancelled", "Nothing was stored.");
    }
  },
  enrolled(msg) {
    setState("enrolled");
    showResult(true, "You're enrolled",
      `Account ${msg.account_id} is ready (${msg.templates} face templates). ` +
      "You can now pay by looking at a FacePay terminal.");
  },
  declined(msg) {
    setState("declined");
    showResult(false, "Enrolment declined", DECLINES[msg.reason] || `Reason: ${msg.reason}`);
  },
  error(msg) {
    if (starting && msg.code !== "frame_too_large") {
      // The start was refused (details, rate limit, store down): no session runs, so the
      // camera goes off and the person can correct the details or try later.
      const why = REFUSALS[msg.code] || `The server refused these details: ${msg.message || msg.code}`;
      backToDetails(`${why} Nothing was captured or stored.`);
      return;
    }
    // On the passphrase screen an invalid_request means "try again", not the end.
    if (document.body.dataset.state === "passphrase") {
      const err = document.getElementById("pass-error");
      err.textContent = "The server refused this passphrase: " + (msg.message || msg.code);
      err.hidden = false;
      document.getElementById("finish").disabled = false;
    } else {
      setText("conn", `Server said: ${msg.message || msg.code}`);
    }
  },
};

function startCapture() {
  setState("connecting");
  showScreen("screen-capture");
  setText("hint", "Starting the camera…");
  document.getElementById("progress").value = 0;
  // Callbacks of a terminal that was stopped (a refused start, a cancel) are ignored.
  const t = new Terminal({
    token: fragment.token,
    video,
    onEvent: (msg) => {
      if (t === terminal) (handlers[msg.type] || (() => {}))(msg);
    },
    onReady: () => {
      if (t !== terminal) return;
      // Consent travels with the request and is recorded in the server's audit log.
      if (t.send({ type: "start_enroll", consent: true, ...details })) starting = true;
    },
    onStatus: (text, ok) => {
      if (t !== terminal) return;
      setText("conn", text);
      if (!ok && !finished) {
        // The server ends an enrolment whose socket dropped; a reconnect starts afresh.
        starting = false;
        inSession = false;
        clearPassphrases();
        setState("connecting");
        showScreen("screen-capture");
        setText("hint", text);
      }
    },
    onFatal: (text) => {
      if (t === terminal) fail(text);
    },
  });
  terminal = t;
  t.start();
}

/** Cancel: the server's enrolment if one runs (it answers "cancelled"), else locally. */
function cancel() {
  if (terminal && inSession && terminal.send({ type: "cancel" })) return;
  // Nothing runs on the server (not started, refused, or the socket is down): closing the
  // connection ends anything it might have begun, and nothing is stored.
  if (document.body.dataset.state === "passphrase") {
    setState("cancelled");
    showResult(false, "Cancelled", "Nothing was stored.");
  } else {
    backToDetails("Cancelled. Nothing was captured or stored.");
  }
}

function wireUi() {
  document.getElementById("agree").addEventListener("click", () => {
    setState("details");
    showScreen("screen-details");
    document.getElementById("account").focus();
  });
  document.getElementById("decline").addEventListener("click", () => {
    setState("declined");
    showResult(false, "No problem", "Nothing was captured or stored.");
  });
  document.getElementById("screen-details").addEventListener("submit", (ev) => {
    ev.preventDefault();
    details = {
      account_id: document.getElementById("account").value.trim(),
      name: document.getElementById("name").value.trim(),
      phone: document.getElementById("phone").value.trim(),
    };
    const err = document.getElementById("details-error");
    if (!phoneValid(details.phone)) {
      // Checked before the camera is asked for: the server would refuse it anyway.
      err.textContent = "Please enter a phone number: 6 to 20 digits, optionally with a " +
        "leading + (spaces and dashes are fine).";
      err.hidden = false;
      document.getElementById("phone").focus();
      return;
    }
    err.hidden = true;
    startCapture();
  });
  document.getElementById("screen-passphrase").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const pass1 = document.getElementById("pass1").value;
    const pass2 = document.getElementById("pass2").value;
    const err = document.getElementById("pass-error");
    if (pass1 !== pass2) {
      err.textContent = "The two passphrases differ. Please type them again.";
      err.hidden = false;
      return;
    }
    err.hidden = true;
    const sent = terminal.send({ type: "enroll_passphrase", passphrase: pass1, confirm: pass2 });
    clearPassphrases(); // the passphrase does not stay in the page
    if (sent) document.getElementById("finish").disabled = true; // until the server answers
  });
  for (const id of ["cancel", "cancel-pass"]) {
    document.getElementById(id).addEventListener("click", cancel);
  }
  document.getElementById("again").addEventListener("click", () => window.location.reload());
}

wireUi();
if (!fragment.token) {
  fail("No terminal token. Open this page as /enroll#token=…");
} else {
  setState("consent");
  document.getElementById("agree").focus();
}
