// Walk-through gate display: boxes per track, open/deny banner, counter, latency list.
import { Terminal, readFragment, setState, setText, drawBoxes, staleClearer } from "./terminal.js";

const COLORS = { open: "#22c55e", deny: "#ef4444" };
const UNDECIDED = "#e5e7eb";
const BANNER_MS = 1500; // how long gate_open/gate_deny stays on screen
const MAX_LISTED = 12;

const fragment = readFragment();
const video = document.getElementById("preview");
const canvas = document.getElementById("overlay");
const clearLater = staleClearer(canvas);
let opens = 0;
let bannerTimer = null;
let baseState = "connecting"; // what data-state returns to after a decision banner

function onFaces(msg) {
  const items = (msg.tracks || []).map((t) => ({
    box: t.box,
    color: COLORS[t.decision] || UNDECIDED,
    label: t.decision ? `#${t.track_id} ${t.decision}` : `#${t.track_id}`,
  }));
  drawBoxes(canvas, video, msg.width, msg.height, items);
  clearLater();
}

function flash(kind, text) {
  // data-state shows the decision briefly, then returns to scanning.
  setState(kind === "open" ? "gate_open" : "gate_deny");
  const banner = document.getElementById("banner");
  banner.textContent = text;
  banner.className = "banner " + kind;
  banner.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => {
    banner.hidden = true;
    setState(baseState);
  }, BANNER_MS);
}

function listDecision(kind, text) {
  const list = document.getElementById("decisions");
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  list.prepend(li);
  while (list.children.length > MAX_LISTED) list.lastChild.remove();
}

function onOpen(msg) {
  opens += 1;
  setText("counter", String(opens));
  flash("open", `Welcome ${msg.account} — gate open`);
  listDecision("open",
    `#${msg.track_id} open ${msg.account}, ${msg.fare} ${msg.currency || ""} — ${msg.decision_ms} ms`);
}

function onDeny(msg) {
  flash("deny", msg.message || "Please use the ticket gate");
  listDecision("deny", `#${msg.track_id} deny (${msg.reason}) — ${msg.decision_ms} ms`);
}

/** body[data-camera] for kiosk automation and tests: `idle` (capped) or `full` rate. */
function showCamera() {
  document.body.dataset.camera = terminal.maxFps ? "idle" : "full";
}

// The server asks for fewer frames while the corridor is empty, and for the full rate as
// soon as anything moves (a new video connection starts at full rate); the terminal has
// applied the request by the time the page hears of it.
const handlers = { faces: onFaces, gate_open: onOpen, gate_deny: onDeny, camera: showCamera };

function fail(text) {
  setState("error");
  setText("status", text);
  setText("conn", "Not connected");
}

const terminal = new Terminal({
  token: fragment.token,
  video,
  onEvent: (msg) => (handlers[msg.type] || (() => {}))(msg),
  onReady: () => {
    // The gate session starts with the video itself: no start message.
    baseState = "scanning";
    setState(baseState);
    showCamera();
    setText("status", "Walk through and look at the camera");
  },
  onStatus: (text, ok) => {
    setText("conn", text);
    showCamera(); // after a re-offer: the new video connection sends its full rate
    if (!ok) {
      baseState = "connecting";
      clearTimeout(bannerTimer);
      document.getElementById("banner").hidden = true;
      setState(baseState);
      setText("status", text);
    }
  },
  onFatal: fail,
});

if (!fragment.token) {
  fail("No terminal token. Open this page as /gate#token=…");
} else {
  setState("connecting");
  terminal.start();
}
