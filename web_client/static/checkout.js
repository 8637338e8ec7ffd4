// Checkout kiosk: scan → confirm with passphrase → approved/declined (docs/protocol.md).
import {
  Terminal, readFragment, setState, showScreen, setText, drawBoxes, staleClearer,
} from "./terminal.js";

const DECLINE_REASONS = {
  no_match: "We could not recognise you. Please pay another way or enrol first.",
  spoof: "Please show your real face, not a photo or screen.",
  ambiguous: "We could not tell you apart from someone else. Please pay another way.",
  wrong_passphrase: "The passphrase was wrong.",
  locked: "This account is locked after too many wrong passphrases. Try again later.",
  limit: "This payment is above your limit. Please pay another way.",
  duplicate_order: "This order was already paid.",
  unavailable: "The payment service is unavailable right now. Nothing was charged.",
  disconnected: "The connection was lost. Nothing was charged.",
  session_timeout: "We did not see a face in time. Nothing was charged.",
  prompt_expired: "The passphrase was not entered in time. Nothing was charged.",
  cancelled: "The payment was cancelled. Nothing was charged.",
  terminal_revoked: "This till is out of service. Nothing was charged.",
  payment_unknown:
    "We could not confirm whether this payment went through. Do not pay again: " +
    "the cashier can check the order.",
};

const STATUS = {
  idle: "Ready",
  connecting: "Connecting…",
  scanning: "Please look at the camera",
  verifying: "Checking who you are…",
};

const fragment = readFragment();
const video = document.getElementById("preview");
const canvas = document.getElementById("overlay");
const clearLater = staleClearer(canvas);
let order = fragment.order || newOrderId();
const amount = fragment.amount || "";
let promptId = null;
let countdownTimer = null;
let sessionOpen = false; // a start_checkout is running on the server
let started = false; // the first checkout was sent
let resumeAfterReconnect = false;

function newOrderId() {
  // Order ids: 1-64 characters of [A-Za-z0-9_.:-].
  return "o-" + Date.now().toString(36) + "-" + Math.floor(Math.random() * 1e6).toString(36);
}

function showStatus(state, text) {
  setState(state);
  showScreen("screen-scan");
  setText("status", text || STATUS[state] || "");
  document.getElementById("cancel-scan").hidden = !(state === "scanning" || state === "verifying");
}

function fail(text) {
  setState("error");
  showScreen("screen-error");
  setText("error-detail", text);
  setText("conn", "Not connected");
}

/**
 * The camera sends video only while a checkout may look at it: from the server's
 * "scanning" until the confirmation prompt (typing a passphrase takes seconds) or the
 * result. Failing to pause costs only server CPU; failing to restart makes the checkout
 * time out (it declines, never pays).
 */
async function sendVideo(on) {
  const ok = await terminal.setVideoSending(on);
  document.body.dataset.video = terminal.videoSending ? "sending" : "paused";
  return ok;
}

function startCheckout() {
  setText("order", order);
  setText("amount", amount);
  document.getElementById("offer").hidden = true;
  document.getElementById("hint").hidden = true;
  if (terminal.send({ type: "start_checkout", amount, order_id: order })) {
    sessionOpen = true;
    showStatus("connecting", "Starting…");
  }
}

function showConfirm(msg) {
  // The shopper has been recognised: the server looks at no more video in this checkout.
  sendVideo(false);
  promptId = msg.prompt_id;
  setState("confirm");
  showScreen("screen-confirm");
  setText("confirm-amount", `${msg.amount} ${msg.currency || ""}`.trim());
  setText("confirm-account", msg.account);
  document.getElementById("wrong").hidden = true;
  const input = document.getElementById("passphrase");
  input.value = "";
  input.focus();
  startCountdown(msg.expires_in_s);
}

function startCountdown(seconds) {
  clearInterval(countdownTimer);
  const deadline = Date.now() + seconds * 1000;
  const tick = () => {
    const left = Math.max(0, Math.ceil((deadline - Date.now()) / 1000));
    setText("countdown", `${left} s`);
    if (left === 0) clearInterval(countdownTimer);
  };
  tick();
  countdownTimer = setInterval(tick, 250);
}

function showResult(ok, title, detail) {
  clearInterval(countdownTimer);
  promptId = null;
  sessionOpen = false;
  sendVideo(false);
  showScreen("screen-result");
  const el = document.getElementById("result-title");
  el.textContent = title;
  el.className = "result " + (ok ? "ok" : "bad");
  setText("result-detail", detail);
  document.getElementById("new-sale").focus();
}

function reasonText(reason) {
  return DECLINE_REASONS[reason] || `Payment declined (${reason || "unknown reason"}).`;
}

function onFaces(msg) {
  const items = (msg.boxes || []).map((box) => ({ box, color: "#38bdf8" }));
  drawBoxes(canvas, video, msg.width, msg.height, items);
  clearLater();
}

// Hints the server sends with "scanning"; a "scanning" without one clears the last.
const SCAN_HINTS = {
  one_person_at_a_time: "Only one person in front of the camera please.",
  farther: "Please step back a little: you are too close to the camera.",
};

function showHint(name) {
  const hint = document.getElementById("hint");
  hint.textContent = SCAN_HINTS[name] || "";
  hint.dataset.hint = name || ""; // for kiosk automation and tests
  hint.hidden = !SCAN_HINTS[name];
}

function onState(msg) {
  switch (msg.state) {
    case "scanning":
      // The server looks from now on: restart the camera. Its encoder begins with a
      // keyframe, which the server can decode at once (one sent before the checkout began
      // would have been discarded, and the server would ask for another).
      sendVideo(true);
      showStatus("scanning");
      showHint(msg.hint);
      break;
    case "verifying":
      document.getElementById("hint").hidden = true;
      showStatus("verifying");
      break;
    case "cancelled":
    case "timeout":
      setState(msg.state);
      showResult(false, msg.state === "timeout" ? "Timed out" : "Cancelled",
        reasonText(msg.reason || msg.state));
      break;
    default:
      break; // awaiting_passphrase/approved/declined come with their own events
  }
}

const handlers = {
  faces: onFaces,
  state: onState,
  confirm: showConfirm,
  need_phone_digits(msg) {
    setState("phone");
    showScreen("screen-phone");
    const left = document.getElementById("phone-left");
    left.textContent = `${msg.attempts_left} attempt(s) left`;
    left.hidden = false;
    document.getElementById("digits").focus();
  },
  wrong_passphrase(msg) {
    const wrong = document.getElementById("wrong");
    wrong.textContent = `Wrong passphrase. ${msg.attempts_left} attempt(s) left.`;
    wrong.hidden = false;
    const input = document.getElementById("passphrase");
    input.value = "";
    input.focus();
  },
  approved(msg) {
    setState("approved");
    showResult(true, "Payment approved",
      `${msg.amount} ${msg.currency || ""} paid by ${msg.account}. Thank you!`);
  },
  declined(msg) {
    setState("declined");
    showResult(false, "Payment declined", reasonText(msg.reason));
  },
  merchant_offer(msg) {
    // Only shown after approval: the offer belongs to the receipt, not the decision.
    if (document.body.dataset.state !== "approved") return;
    const offer = document.getElementById("offer");
    offer.textContent = msg.text;
    offer.hidden = false;
  },
  error(msg) {
    setText("conn", `Server said: ${msg.message || msg.code}`);
  },
};

const terminal = new Terminal({
  token: fragment.token,
  video,
  onEvent: (msg) => (handlers[msg.type] || (() => {}))(msg),
  onReady: () => {
    // First connection, or a session cut short by a dropped socket (the server charged
    // nothing and forgot it): run this order again. The same order id means a payment
    // that was written just before the drop cannot be taken twice (duplicate_order).
    if (!started || resumeAfterReconnect) {
      started = true;
      resumeAfterReconnect = false;
      startCheckout();
      return;
    }
    // Otherwise the last sale had ended: show its result again and wait for "New sale"
    // (the new connection sends no video until then).
    sendVideo(false);
    setState("idle");
    showScreen("screen-result");
  },
  onStatus: (text, ok) => {
    setText("conn", text);
    if (!ok && document.body.dataset.state !== "error") {
      if (sessionOpen) resumeAfterReconnect = true;
      sessionOpen = false;
      clearInterval(countdownTimer);
      showStatus("connecting", text);
    }
  },
  onFatal: fail,
});

function wireUi() {
  document.getElementById("screen-confirm").addEventListener("submit", (ev) => {
    ev.preventDefault(); // Enter in the field submits here too
    const input = document.getElementById("passphrase");
    if (!promptId || !input.value) return;
    terminal.send({ type: "passphrase", prompt_id: promptId, passphrase: input.value });
    setText("wrong", "Checking…");
    document.getElementById("wrong").hidden = false;
  });
  document.getElementById("screen-phone").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const digits = document.getElementById("digits");
    terminal.send({ type: "phone_digits", digits: digits.value });
    digits.value = "";
    showStatus("verifying");
  });
  document.getElementById("keypad").addEventListener("click", (ev) => {
    const key = ev.target.closest("button") && ev.target.closest("button").dataset.key;
    if (!key) return;
    const input = document.getElementById("passphrase");
    if (key === "clear") input.value = "";
    else if (key === "back") input.value = input.value.slice(0, -1);
    else input.value += key;
    input.focus();
  });
  for (const btn of document.querySelectorAll("[data-action=cancel], #cancel-scan")) {
    btn.addEventListener("click", () => terminal.send({ type: "cancel" }));
  }
  document.getElementById("new-sale").addEventListener("click", () => {
    order = newOrderId();
    startCheckout();
  });
}

function main() {
  wireUi();
  setText("order", order);
  setText("amount", amount);
  if (!fragment.token) {
    fail("No terminal token. Open this page as /checkout#token=…&amount=12.50&order=O1.");
    return;
  }
  if (!/^\d+(\.\d{1,2})?$/.test(amount)) {
    fail("No valid amount. Add &amount=12.50 to the link.");
    return;
  }
  showStatus("connecting", "Starting the camera…");
  terminal.start();
}

main();
