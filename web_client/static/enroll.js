// Enrolment kiosk: consent → details → guided capture → passphrase → result.
// The camera is only requested after consent and details (docs/protocol.md, Enrolment).
import {
  Terminal, readFragment, setState, showScreen, setText, drawBoxes, staleClearer, clearOverlay,
} from "./terminal.js";

const HINTS = {
  closer: "Come a little closer",
  farther: "Move back a little",
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
  unavailable: "The service is unavailable right now. Nothing was stored.",
};

const fragment = readFragment();
const video = document.getElementById("preview");
const canvas = document.getElementById("overlay");
const clearLater = staleClearer(canvas);
let terminal = null;
let details = null;
let finished = false;

function fail(text) {
  setState("error");
  showScreen("screen-error");
  setText("error-detail", text);
  setText("conn", "Not connected");
}

function showResult(ok, title, detail) {
  finished = true;
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
    // On the passphrase screen an invalid_request means "try again", not the end.
    if (document.body.dataset.state === "passphrase") {
      const err = document.getElementById("pass-error");
      err.textContent = "The server refused this passphrase: " + (msg.message || msg.code);
      err.hidden = false;
    } else {
      setText("conn", `Server said: ${msg.message || msg.code}`);
    }
  },
};

function startCapture() {
  setState("connecting");
  showScreen("screen-capture");
  setText("hint", "Starting the camera…");
  terminal = new Terminal({
    token: fragment.token,
    video,
    onEvent: (msg) => (handlers[msg.type] || (() => {}))(msg),
    onReady: () => {
      // Consent travels with the request and is recorded in the server's audit log.
      terminal.send({ type: "start_enroll", consent: true, ...details });
    },
    onStatus: (text, ok) => {
      setText("conn", text);
      if (!ok && !finished) {
        setState("connecting");
        showScreen("screen-capture");
        setText("hint", text);
      }
    },
    onFatal: fail,
  });
  terminal.start();
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
    terminal.send({ type: "enroll_passphrase", passphrase: pass1, confirm: pass2 });
  });
  document.getElementById("cancel").addEventListener("click", () => {
    if (terminal) terminal.send({ type: "cancel" });
  });
  document.getElementById("again").addEventListener("click", () => window.location.reload());
}

wireUi();
if (!fragment.token) {
  fail("No terminal token. Open this page as /enroll#token=…");
} else {
  setState("consent");
  document.getElementById("agree").focus();
}
