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
    "We could not confirm whether this payment went through. Do not take another " +
    "payment for this order: check again (the same order cannot be charged twice).",
};

// Why the server refused to start a checkout (an "error" before it was scanning).
const REFUSALS = {
  rate_limited: "Too many payments were started on this till. Please wait a moment.",
  unavailable: "The payment service is unavailable right now.",
  busy: "A payment is already running on this till.",
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
let answerSent = false; // the passphrase for this prompt went out; no second one until told
let countdownTimer = null;
let retryTimer = null;
let sessionOpen = false; // a start_checkout is running on the server
let starting = false; // a start_checkout was sent and its checkout is not scanning yet
let started = false; // the first checkout was sent
let uncertainOrder = null; // the order whose payment the server could not confirm
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
  clearPassphrase();
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

/** Empty the passphrase field: a typed passphrase never stays in the page. */
function clearPassphrase() {
  document.getElementById("passphrase").value = "";
}

/** Lock (after an answer went out) or unlock the passphrase field, the keypad and Pay. */
function lockPassphrase(locked) {
  answerSent = locked;
  const controls = document.querySelectorAll("#passphrase, #pay, #keypad button");
  for (const el of controls) el.disabled = locked;
}

function startCheckout() {
  clearInterval(retryTimer);
  clearPassphrase();
  setText("order", order);
  setText("amount", amount);
  document.getElementById("offer").hidden = true;
  document.getElementById("hint").hidden = true;
  if (terminal.send({ type: "start_checkout", amount, order_id: order })) {
    sessionOpen = true;
    starting = true;
    showStatus("connecting", "Starting…");
  }
}

function showConfirm(msg) {
  // The shopper has been recognised: the server looks at no more video in this checkout.
  sendVideo(false);
  promptId = msg.prompt_id;
  starting = false;
  lockPassphrase(false);
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

/**
 * The end of a checkout. `look`: "ok", "bad" or "warn" (neither paid nor declined).
 * `again`: {label, waitS} offers a button that runs the SAME order again (after `waitS`
 * seconds when given); "New sale" then stays available but is no longer the main action.
 */
function showResult(look, title, detail, again = null) {
  clearInterval(countdownTimer);
  clearInterval(retryTimer);
  clearPassphrase();
  promptId = null;
  sessionOpen = false;
  starting = false;
  sendVideo(false);
  showScreen("screen-result");
  const el = document.getElementById("result-title");
  el.textContent = title;
  el.className = "result " + look;
  setText("result-detail", detail);
  const retry = document.getElementById("retry");
  const newSale = document.getElementById("new-sale");
  retry.hidden = !again;
  newSale.className = again ? "" : "primary";
  if (!again) {
    newSale.focus();
    return;
  }
  const deadline = Date.now() + (Number(again.waitS) || 0) * 1000;
  const tick = () => {
    const left = Math.max(0, Math.ceil((deadline - Date.now()) / 1000));
    retry.disabled = left > 0;
    retry.textContent = left > 0 ? `${again.label} (${left} s)` : again.label;
    if (left === 0) {
      clearInterval(retryTimer);
      retry.focus();
    }
  };
  tick();
  if (retry.disabled) retryTimer = setInterval(tick, 250);
}

/** The server refused to start this order's checkout: nothing ran, nothing was charged. */
function showRefused(msg) {
  if (order === uncertainOrder) {
    // Checking an unknown payment again was refused: that says nothing about the first
    // payment, so the till must still not take another one for this order.
    setState("payment_unknown");
    showResult("warn", "Payment status unknown", reasonText("payment_unknown"), {
      label: "Check again",
      waitS: msg.retry_after_s,
    });
    return;
  }
  setState("refused");
  const why = REFUSALS[msg.code] || `The server refused this payment: ${msg.message || msg.code}`;
  showResult("bad", "Payment not started", `${why} Nothing was charged.`, {
    label: "Retry",
    waitS: msg.retry_after_s,
  });
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
  move_to_centre: "Please move to the middle of the picture.",
  upside_down: "The camera picture is upside down: please ask staff for help.",
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
      starting = false;
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
      showResult("bad", msg.state === "timeout" ? "Timed out" : "Cancelled",
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
    lockPassphrase(false);
    const input = document.getElementById("passphrase");
    input.value = "";
    input.focus();
  },
  approved(msg) {
    setState("approved");
    showResult("ok", "Payment approved",
      `${msg.amount} ${msg.currency || ""} paid by ${msg.account}. Thank you!`);
  },
  declined(msg) {
    // "unavailable" on checking again says only that this check charged nothing: whether
    // the first payment went through is still unknown.
    const stillUnknown = msg.reason === "unavailable" && order === uncertainOrder;
    if (msg.reason === "payment_unknown" || stillUnknown) {
      // Maybe paid, maybe not: never a new order. Asking again with the same order id
      // answers "already paid" (duplicate_order) or runs it, and cannot charge twice.
      uncertainOrder = order;
      setState("payment_unknown");
      showResult("warn", "Payment status unknown", reasonText("payment_unknown"),
        { label: "Check again" });
      return;
    }
    if (msg.reason === "duplicate_order") {
      setState("already_paid");
      const which = msg.payment_id ? ` (payment ${msg.payment_id})` : "";
      showResult("ok", "This order is already paid",
        `Order ${order} was paid earlier${which}. Nothing more was charged.`);
      return;
    }
    setState("declined");
    showResult("bad", "Payment declined", reasonText(msg.reason));
  },
  merchant_offer(msg) {
    // Only shown after approval: the offer belongs to the receipt, not the decision.
    if (document.body.dataset.state !== "approved") return;
    const offer = document.getElementById("offer");
    offer.textContent = msg.text;
    offer.hidden = false;
  },
  error(msg) {
    if (starting && msg.code !== "frame_too_large") {
      showRefused(msg); // the start itself was refused (rate limit, store down, bad request)
      return;
    }
    if (promptId && document.body.dataset.state === "confirm") {
      // The answer was not taken (e.g. it could not be counted): the shopper may try again.
      const wrong = document.getElementById("wrong");
      wrong.textContent = `Not checked: ${msg.message || msg.code}. Please try again.`;
      wrong.hidden = false;
      lockPassphrase(false);
      document.getElementById("passphrase").focus();
      return;
    }
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
      starting = false;
      clearPassphrase();
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
    // One answer per try: a second Pay or Enter before the server replied sends nothing.
    if (!promptId || answerSent || !input.value) return;
    const sent = terminal.send({ type: "passphrase", prompt_id: promptId, passphrase: input.value });
    input.value = ""; // the passphrase does not stay in the page
    if (!sent) return;
    lockPassphrase(true); // until wrong_passphrase, an error or a new prompt
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
  // "Retry" / "Check again": the same order id and amount, never a new order.
  document.getElementById("retry").addEventListener("click", () => startCheckout());
}

function main() {
  wireUi();
  setText("order", order);
  setText("amount", amount);
  if (!fragment.token) {
    fail("No terminal token. Open this page as /checkout#token=…&amount=12.50&order=O1.");
    return;
  }
  // The server's rule: at most 13 digits and two decimals, more than zero.
  if (!/^[0-9]{1,13}(\.[0-9]{1,2})?$/.test(amount) || !(Number(amount) > 0)) {
    fail(
      `No valid amount (${amount || "none"}): it must be more than 0 with at most two ` +
        "decimals. Add &amount=12.50 to the link.",
    );
    return;
  }
  showStatus("connecting", "Starting the camera…");
  terminal.start();
}

main();
