// Shared terminal logic for the FacePay demo pages (docs/protocol.md):
// provisioning from the URL fragment, the WebSocket with hello and reconnect,
// camera capture and the WebRTC offer/answer, and the body[data-state] mirror.

/** Read `#token=T&amount=12.50&order=O`. The fragment never reaches server logs. */
export function readFragment() {
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  return Object.fromEntries(params.entries());
}

/** Mirror the page state for kiosk automation and tests: body[data-state=...]. */
export function setState(state) {
  document.body.dataset.state = state;
}

/** Show exactly one of the page's screens (elements with class "screen"). */
export function showScreen(id) {
  for (const el of document.querySelectorAll(".screen")) {
    el.hidden = el.id !== id;
  }
}

/** Set an element's text by id (textContent only: server text is never parsed as HTML). */
export function setText(id, text) {
  const el = document.getElementById(id);
  if (el) el.textContent = text;
}

/** Plain-words messages for camera errors (getUserMedia rejections). */
export function cameraMessage(err) {
  const name = err && err.name;
  if (name === "NotAllowedError" || name === "SecurityError") {
    return "Camera access was denied. Allow the camera for this page and reload.";
  }
  if (name === "NotFoundError" || name === "OverconstrainedError") {
    return "No camera was found. Connect a camera and reload.";
  }
  if (name === "NotReadableError") {
    return "The camera is in use by another program. Close it and reload.";
  }
  return "The camera could not be started" + (err && err.message ? ": " + err.message : ".");
}

function wsUrl() {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}/ws`;
}

function waitIceComplete(pc, timeoutMs = 5000) {
  // The server does not take trickled candidates: the offer must carry them all.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    // Send what was gathered so far rather than hanging forever.
    setTimeout(resolve, timeoutMs);
  });
}

/**
 * One terminal connection. Callbacks:
 *   onEvent(msg)        every server event after hello
 *   onReady(hello)      hello accepted and video negotiated (again after a reconnect)
 *   onStatus(text, ok)  connection status line in plain words
 *   onFatal(text)       unrecoverable (bad token, no camera): stop and say why
 */
export class Terminal {
  constructor({ token, video, onEvent, onReady, onStatus, onFatal }) {
    this.token = token;
    this.video = video;
    this.onEvent = onEvent || (() => {});
    this.onReady = onReady || (() => {});
    this.onStatus = onStatus || (() => {});
    this.onFatal = onFatal || (() => {});
    this.ws = null;
    this.pc = null;
    this.stream = null;
    this.retryDelayMs = 1000;
    this.videoRetryMs = 0; // the last re-offer delay after video_lost (doubles, up to 30 s)
    this.videoLostAt = 0;
    this.reoffering = false;
    this.answering = null; // setRemoteDescription of the latest answer, while it runs
    this.stopped = false;
    this.videoSending = false; // whether the current peer connection sends video
    this.maxFps = null; // the frame-rate cap the current peer connection applies; null: none
  }

  /**
   * Connect, then start the camera once the server accepted the token (a kiosk with a
   * bad link never turns its camera on). The camera is never asked for before this call.
   */
  start() {
    this.connect();
  }

  async openCamera() {
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        video: { width: 640, height: 480 },
        audio: false,
      });
    } catch (err) {
      if (this.stopped) return false; // stopped while asking: nothing to report
      this.stop();
      this.onFatal(cameraMessage(err));
      return false;
    }
    if (this.stopped) {
      // stop() came while the browser was opening the camera: turn it straight off again
      // (the preview element may already show another terminal's camera: left alone).
      for (const t of this.stream.getTracks()) t.stop();
      this.stream = null;
      return false;
    }
    this.video.srcObject = this.stream;
    this.video.muted = true;
    this.video.play().catch(() => {}); // autoplay of a muted stream is allowed
    return true;
  }

  connect() {
    if (this.stopped) return;
    this.onStatus("Connecting to the server…", false);
    const ws = new WebSocket(wsUrl());
    this.ws = ws;
    ws.addEventListener("open", () => ws.send(JSON.stringify({ type: "hello", token: this.token })));
    ws.addEventListener("message", (ev) => this.handleMessage(ev.data));
    ws.addEventListener("close", (ev) => this.handleClose(ev));
  }

  async handleMessage(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg.type === "hello") {
      this.retryDelayMs = 1000; // a good connection resets the back-off
      this.onStatus("Connected", true);
      if (!this.stream && !(await this.openCamera())) return;
      await this.negotiate(msg);
      return;
    }
    if (msg.type === "answer") {
      // Kept so a request for this connection that follows the answer at once (the
      // frame-rate cap) can wait for it: messages are handled concurrently.
      this.answering = this.pc.setRemoteDescription({
        type: msg.sdp_type || "answer",
        sdp: msg.sdp,
      });
      await this.answering;
      if (this.reoffering) {
        // Same socket, same session: only the video came back; the page carries on.
        this.reoffering = false;
        this.onStatus("Connected", true);
        return;
      }
      this.onReady(this.hello);
      return;
    }
    if (msg.type === "error" && msg.code === "video_lost") {
      this.videoLost();
      return;
    }
    if (msg.type === "camera") {
      // Every page obeys (a checkout's or an enrolment's cap right after the answer, an
      // idle gate's lower rate): more frames would only cost the server CPU. Applied before
      // the page hears of it, so the page can show what its sender does.
      await this.setMaxFramerate(msg.max_fps).catch((err) => console.warn(err));
    }
    this.onEvent(msg);
  }

  /**
   * The server lost our video (ICE consent or DTLS failed) but kept the socket and the
   * session: offer again, or every checkout would only time out. Back off (1 s doubling to
   * 30 s, reset after a minute without loss) so a broken network is not hammered.
   */
  videoLost() {
    if (this.stopped || !this.stream) return;
    const now = Date.now();
    const fresh = now - this.videoLostAt > 60000;
    this.videoLostAt = now;
    const delay = fresh ? 1000 : Math.min(Math.max(this.videoRetryMs * 2, 1000), 30000);
    this.videoRetryMs = delay;
    this.onStatus(`Video connection lost. Reconnecting the camera in ${delay / 1000} s…`, true);
    const ws = this.ws;
    setTimeout(() => {
      // Only on the socket that lost it: a reconnect in between negotiates by itself.
      if (this.stopped || this.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
      this.reoffering = true;
      this.negotiate(this.hello);
    }, delay);
  }

  /** A fresh peer connection per socket: the server ties video to the connection. */
  async negotiate(hello) {
    this.hello = hello;
    if (this.pc) this.pc.close();
    const pc = new RTCPeerConnection({ iceServers: [] });
    this.pc = pc;
    this.videoSending = true; // a new connection sends until told otherwise
    this.maxFps = null; // ... at the camera's full rate, as the server assumes
    for (const track of this.stream.getVideoTracks()) pc.addTrack(track, this.stream);
    await pc.setLocalDescription(await pc.createOffer());
    await waitIceComplete(pc);
    this.send({ type: "offer", sdp: pc.localDescription.sdp, sdp_type: "offer" });
  }

  handleClose(ev) {
    this.reoffering = false; // the next socket negotiates afresh, and says onReady
    if (this.pc) {
      this.pc.close();
      this.pc = null;
    }
    if (this.stopped) return;
    if (ev.code === 4401) {
      this.onFatal("This terminal's token was refused. Ask the operator for a new link.");
      return;
    }
    if (ev.code === 4403) {
      this.onFatal("This terminal is not set up for this page (wrong terminal mode).");
      return;
    }
    // Server restart or network blip: try again, waiting longer each time (max 30 s).
    const seconds = Math.round(this.retryDelayMs / 1000);
    const what = this.hello ? "Connection to the server lost" : "Server unreachable";
    this.onStatus(`${what}. Reconnecting in ${seconds} s…`, false);
    setTimeout(() => this.connect(), this.retryDelayMs);
    this.retryDelayMs = Math.min(this.retryDelayMs * 2, 30000);
  }

  /**
   * Stop or restart sending video; the camera and its preview stay on. A checkout kiosk
   * sends nothing while no checkout looks: the server decodes only then, but receiving
   * 15 frames a second costs it CPU all the same (about 30 % of an idle kiosk's server
   * CPU, docs/performance.md). A restarted encoder begins with a keyframe; the server asks
   * for one only if it skipped frames since its last checkout. Resolves to whether every
   * video sender is now in that state.
   */
  setVideoSending(on) {
    return this.editVideo(
      (enc) => {
        if (enc.active === on) return false;
        enc.active = on;
        return true;
      },
      on ? "restart the video" : "pause the video",
      () => (this.videoSending = on),
    );
  }

  /**
   * Send at most `fps` frames a second (a positive number), or the camera's full rate again
   * (null). A gate's server looks at only a few frames a second while the corridor is empty
   * and says so ({"type": "camera", "max_fps": N}); receiving and decoding the rest costs
   * it CPU. Errs towards frames: anything but a positive number means full rate, a failure
   * (a browser without maxFramerate) only warns and leaves the video as it was, and a
   * request that came before the server answered the current peer connection is dropped
   * (it was meant for the previous one; a new connection starts at full rate). For checkout
   * and enrolment the server caps the rate right after its answer: such a request waits for
   * the answer to be applied. Resolves to whether every video sender now applies it;
   * `maxFps` says what they apply.
   */
  async setMaxFramerate(fps) {
    const cap = typeof fps === "number" && Number.isFinite(fps) && fps > 0 ? fps : null;
    const pc = this.pc;
    if (pc && !pc.remoteDescription && this.answering) {
      await this.answering.catch(() => {}); // its answer is being applied
    }
    if (!pc || pc !== this.pc || !pc.remoteDescription) return false;
    const edit = (enc) => {
      if (cap === null) {
        if (enc.maxFramerate === undefined) return false;
        delete enc.maxFramerate; // Chrome: no value, no limit
        return true;
      }
      if (enc.maxFramerate === cap) return false;
      enc.maxFramerate = cap;
      return true;
    };
    const what = cap === null ? "restore the full frame rate" : `cap the video at ${cap} fps`;
    return this.editVideo(edit, what, () => (this.maxFps = cap), pc);
  }

  /**
   * Apply `edit(encoding)` (changes one encoding in place, says whether it changed it) to
   * every encoding of every video sender. One change at a time, `active` and `maxFramerate`
   * alike: setParameters must get what the last getParameters returned. `applied()` runs
   * once every video sender of the still current peer connection has the change. `forPc`:
   * only if that is still the current peer connection (default: whichever is current by
   * then). Resolves to whether every video sender now has the change; a failure only warns.
   */
  editVideo(edit, what, applied, forPc = null) {
    const previous = (this.videoChange || Promise.resolve()).catch(() => false);
    this.videoChange = previous.then(() => this.applyVideoEdit(edit, what, applied, forPc));
    return this.videoChange;
  }

  async applyVideoEdit(edit, what, applied, forPc) {
    const pc = this.pc;
    if (!pc || (forPc && forPc !== pc)) return false;
    let ok = true;
    for (const sender of pc.getSenders()) {
      if (!sender.track || sender.track.kind !== "video") continue;
      const params = sender.getParameters();
      if (!params.encodings || !params.encodings.length) {
        ok = false; // not negotiated yet: it sends as soon as it is
        continue;
      }
      // Every encoding, even once one changed: no short-circuit.
      if (!params.encodings.map(edit).includes(true)) continue;
      try {
        await sender.setParameters(params);
      } catch (err) {
        console.warn("could not %s: %s", what, err);
        ok = false;
      }
    }
    if (ok && pc === this.pc) applied();
    return ok;
  }

  send(obj) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  /**
   * Turn the camera off and send no more video, but keep the connection: an enrolment
   * needs no picture once its capture is over. The peer connection stays (its track is
   * ended, so nothing is sent); a reconnect asks for the camera again.
   */
  closeCamera() {
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    this.stream = null;
    this.video.srcObject = null;
    this.videoSending = false;
  }

  stop() {
    this.stopped = true;
    if (this.ws) this.ws.close();
    if (this.pc) this.pc.close();
    this.closeCamera();
  }
}

/**
 * Draw face boxes over the preview. Boxes are in the server's frame coordinates
 * (event width/height); the video is letterboxed (object-fit: contain) in its element.
 * items: [{box: [x1,y1,x2,y2], color, label}]
 */
export function drawBoxes(canvas, video, frameW, frameH, items) {
  const rect = canvas.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(rect.width * dpr);
  canvas.height = Math.round(rect.height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, rect.width, rect.height);
  if (!frameW || !frameH) return;
  // Where the picture sits inside the element: same aspect as the frame, centred.
  const scale = Math.min(rect.width / frameW, rect.height / frameH);
  const offX = (rect.width - frameW * scale) / 2;
  const offY = (rect.height - frameH * scale) / 2;
  ctx.lineWidth = 3;
  ctx.font = "bold 16px system-ui, sans-serif";
  for (const item of items) {
    const [x1, y1, x2, y2] = item.box;
    const x = offX + x1 * scale;
    const y = offY + y1 * scale;
    ctx.strokeStyle = item.color;
    ctx.strokeRect(x, y, (x2 - x1) * scale, (y2 - y1) * scale);
    if (item.label) {
      ctx.fillStyle = item.color;
      ctx.fillText(item.label, x + 2, Math.max(16, y - 6));
    }
  }
}

/** Remove every box from the overlay. */
export function clearOverlay(canvas) {
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

/** Clear the overlay when no faces event came for a while (the face left). */
export function staleClearer(canvas, ms = 1200) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(() => clearOverlay(canvas), ms);
  };
}
