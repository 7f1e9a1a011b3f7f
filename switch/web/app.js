// Parley's web client: the IM protocol (docs/protocol.md) over a WebSocket, one JSON
// message per text frame. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const IDLE_AWAY_MS = 5 * 60 * 1000;

const state = {
  ws: null,
  me: null,            // { tenant, user, number }
  chosen: "available", // the status the user picked
  sent: null,          // the status last sent
  lastInput: Date.now(),
  book: new Map(),     // address -> entry
  presence: new Map(), // user -> { status, note, devices }
  chats: new Map(),    // user -> [message]
  chatWith: null,
  ring: null,          // { call_id, from, from_name }
  call: null,          // { call_id, peer, state, since, muted }
  nextId: 1,
  searching: null,
};

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}

function notice(text) {
  const n = $("notice");
  n.textContent = text;
  n.classList.add("show");
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => n.classList.remove("show"), 3500);
}

// ---- sign in -------------------------------------------------------------------------

$("signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  connect({
    tenant: $("tenant").value.trim(),
    user: $("user").value.trim(),
    password: $("password").value,
  });
});

function deviceName() {
  let d = sessionStorage.getItem("parley-device");
  if (!d) {
    d = "web-" + Math.random().toString(36).slice(2, 8);
    sessionStorage.setItem("parley-device", d);
  }
  return d;
}

function connect(creds) {
  $("signin-error").textContent = "";
  $("signin-button").disabled = true;
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  state.ws = ws;
  ws.onopen = () => send({
    type: "login", tenant: creds.tenant, user: creds.user,
    password: creds.password || "", token: creds.token, device: deviceName(),
  });
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    handle(msg, creds);
  };
  ws.onclose = () => {
    $("signin-button").disabled = false;
    if (state.pc) {
      state.pc.close();
      state.pc = null;
    }
    if (state.me) {
      state.me = null;
      $("app").hidden = true;
      $("signin").hidden = false;
      $("signin-error").textContent = "Disconnected. Sign in again.";
    }
  };
}

$("signout").addEventListener("click", () => {
  sessionStorage.removeItem("parley-token");
  if (state.ws) state.ws.close();
});

// ---- messages from the node ----------------------------------------------------------

function handle(msg, creds) {
  switch (msg.type) {
    case "login_ok":
      state.me = { tenant: creds.tenant, user: creds.user, number: msg.number, name: msg.display_name };
      $("password").value = "";
      $("signin").hidden = true;
      $("app").hidden = false;
      $("me-name").textContent = msg.display_name || creds.user;
      $("me-number").textContent = msg.number;
      state.book.clear();
      sendPresence(true);
      send({ type: "call_history", id: state.nextId++ });
      startMedia();
      break;
    case "reconnect":
      // The node is draining: calls in progress go on; sign in again (to another node
      // behind the same address) once this one has gone.
      notice("This server is going away for maintenance: sign in again after your call.");
      break;
    case "webrtc_answer":
      if (state.pc) state.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp }).catch((e) => notice("Audio: " + e));
      break;
    case "error":
      if (!state.me) {
        $("signin-error").textContent = msg.message;
      } else {
        notice(msg.message);
      }
      break;
    case "address_book":
      if (msg.offset === 0) state.book.clear();
      for (const e of msg.entries) state.book.set(e.address, e);
      renderBook();
      break;
    case "address_book_update":
      for (const e of msg.entries) state.book.set(e.address, e);
      for (const a of msg.removed) state.book.delete(a);
      renderBook();
      send({ type: "call_history", id: state.nextId++ });
      break;
    case "book_ok":
      if (msg.entry) state.book.set(msg.entry.address, msg.entry);
      renderBook();
      break;
    case "book_results":
      if (state.searching === msg.query) renderBook(msg.entries);
      break;
    case "presence_update":
      state.presence.set(msg.user, msg);
      renderBook();
      renderChatTitle();
      break;
    case "chat":
      addChat(msg.own ? msg.to : msg.from, {
        id: msg.id, from: msg.from, text: msg.text, at: msg.sent_at_ms, mine: msg.own,
      });
      if (!msg.own) {
        if (!state.chatWith) openChat(msg.from);
        if (state.chatWith === msg.from && !document.hidden) send({ type: "chat_read", message: msg.id });
        else notice(`${msg.from}: ${msg.text}`);
      }
      break;
    case "chat_ack":
      break;
    case "chat_history":
      state.chats.set(msg.with, msg.messages.map((m) => ({
        id: m.id, from: m.from, text: m.text, at: m.sent_at_ms, mine: m.from === state.me.user,
      })));
      renderChat();
      break;
    case "incoming_call":
      send({ type: "ringing", call_id: msg.call_id });
      state.ring = msg;
      renderCall();
      break;
    case "dialing":
      state.call = { call_id: msg.call_id, peer: msg.to, state: "Calling…", since: null, muted: false };
      renderCall();
      break;
    case "call_ringing":
      if (state.call && state.call.call_id === msg.call_id) { state.call.state = "Ringing…"; renderCall(); }
      break;
    case "call_connected":
      if (state.ring && state.ring.call_id === msg.call_id) {
        state.call = { call_id: msg.call_id, peer: state.ring.from_name || state.ring.from, muted: false };
        state.ring = null;
      }
      if (state.call && state.call.call_id === msg.call_id) {
        state.call.state = "Connected";
        state.call.since = Date.now();
        state.call.dtmf = msg.telephone_event != null;
        state.call.video = msg.video_flow_id != null;
        // The microphone goes out once the sender has the call's codec.
        sendCodec(msg.payload_type).finally(() => microphone(true));
        camera(state.call.video);
      }
      renderCall();
      break;
    case "call_ended":
      if (state.ring && state.ring.call_id === msg.call_id) state.ring = null;
      if (state.call && state.call.call_id === msg.call_id) {
        state.call = null;
        microphone(false);
        camera(false);
        notice("Call ended");
      }
      renderCall();
      send({ type: "call_history", id: state.nextId++ });
      break;
    case "call_history":
      renderHistory(msg.calls);
      break;
    default:
      break;
  }
}

// ---- presence ------------------------------------------------------------------------

function effectiveStatus() {
  if (state.chosen !== "available") return state.chosen;
  if (document.hidden || Date.now() - state.lastInput > IDLE_AWAY_MS) return "away";
  return "available";
}

function sendPresence(force) {
  if (!state.me) return;
  const status = effectiveStatus();
  if (!force && status === state.sent) return;
  state.sent = status;
  send({ type: "presence", status, idle_ms: Math.max(0, Date.now() - state.lastInput) });
  $("me-dot").className = "dot " + status;
}

$("status").addEventListener("change", () => { state.chosen = $("status").value; sendPresence(false); });
document.addEventListener("visibilitychange", () => sendPresence(false));
for (const ev of ["keydown", "mousemove", "pointerdown", "focus"]) {
  window.addEventListener(ev, () => { state.lastInput = Date.now(); sendPresence(false); }, { passive: true });
}
setInterval(() => sendPresence(false), 15000);

// ---- address book --------------------------------------------------------------------

function entryName(e) { return e.name || e.address; }

function sortedBook() {
  return [...state.book.values()].sort((a, b) =>
    (b.favourite - a.favourite) || (b.last_seen || "").localeCompare(a.last_seen || ""));
}

function renderBook(results) {
  const list = $("book");
  list.textContent = "";
  const entries = results || sortedBook();
  $("book-empty").hidden = entries.length > 0;
  for (const e of entries) {
    const li = document.createElement("li");
    li.dataset.address = e.address;
    if (e.user && e.user === state.chatWith) li.classList.add("selected");
    const dot = document.createElement("span");
    const p = e.user ? state.presence.get(e.user) : null;
    dot.className = "dot " + (p ? p.status : "none");
    dot.title = p ? p.status.replace(/_/g, " ") : "not a Parley user";
    const who = document.createElement("div");
    who.className = "who";
    const top = document.createElement("div");
    top.textContent = entryName(e);
    if (e.favourite) top.insertAdjacentHTML("afterbegin", '<span class="fav">★ </span>');
    if (e.blocked) top.insertAdjacentHTML("beforeend", ' <span class="blocked">blocked</span>');
    const sub = document.createElement("div");
    sub.className = "muted";
    sub.textContent = (e.name ? e.address + " · " : "") + `${e.call_count} call${e.call_count === 1 ? "" : "s"}` +
      (e.note ? " · " + e.note : "");
    who.append(top, sub);
    who.addEventListener("click", () => { if (e.user) openChat(e.user); });
    const call = button("Call", () => dial(e.address));
    call.className = "call";
    const edit = button("Edit", () => openEdit(e));
    edit.className = "edit";
    li.append(dot, who, call, edit);
    list.append(li);
  }
}

function button(text, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", onclick);
  return b;
}

$("book-search").addEventListener("input", () => {
  const q = $("book-search").value.trim();
  state.searching = q || null;
  if (q) send({ type: "book_search", query: q, id: state.nextId++ });
  else renderBook();
});

let editing = null;
function openEdit(e) {
  editing = e;
  $("edit-title").textContent = e.address;
  $("edit-name").value = e.name || "";
  $("edit-note").value = e.note || "";
  $("edit-favourite").checked = !!e.favourite;
  $("edit-blocked").checked = !!e.blocked;
  $("edit").showModal();
}

$("edit").addEventListener("close", () => {
  const e = editing;
  editing = null;
  if (!e) return;
  const how = $("edit").returnValue;
  if (how === "delete") {
    send({ type: "book_delete", address: e.address, id: state.nextId++ });
    state.book.delete(e.address);
    renderBook();
  } else if (how === "save") {
    send({
      type: "book_set", address: e.address, id: state.nextId++,
      name: $("edit-name").value, note: $("edit-note").value, favourite: $("edit-favourite").checked,
    });
    if ($("edit-blocked").checked !== !!e.blocked) {
      send({ type: "book_block", address: e.address, blocked: $("edit-blocked").checked, id: state.nextId++ });
    }
  }
});

// ---- chat ----------------------------------------------------------------------------

function openChat(user) {
  state.chatWith = user;
  $("chat-form").hidden = false;
  $("chat-hint").hidden = true;
  renderChatTitle();
  renderBook();
  renderChat();
  send({ type: "chat_history", with: user, id: state.nextId++ });
  $("chat-text").focus();
}

function renderChatTitle() {
  if (!state.chatWith) return;
  const p = state.presence.get(state.chatWith);
  $("chat-title").textContent = state.chatWith + (p ? ` (${p.status.replace(/_/g, " ")})` : "");
}

function addChat(peer, m) {
  const list = state.chats.get(peer) || [];
  if (!list.some((x) => x.id === m.id && m.id)) list.push(m);
  state.chats.set(peer, list);
  if (peer === state.chatWith) renderChat();
}

function renderChat() {
  const ol = $("messages");
  ol.textContent = "";
  for (const m of state.chats.get(state.chatWith) || []) {
    const li = document.createElement("li");
    if (m.mine) li.classList.add("mine");
    li.textContent = m.text;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = new Date(m.at).toLocaleTimeString();
    li.append(meta);
    ol.append(li);
  }
  ol.scrollTop = ol.scrollHeight;
  const last = (state.chats.get(state.chatWith) || []).filter((m) => !m.mine).pop();
  if (last && !document.hidden) send({ type: "chat_read", message: last.id });
}

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("chat-text").value;
  if (!text || !state.chatWith) return;
  const id = state.nextId++;
  send({ type: "chat", to: state.chatWith, text, id });
  addChat(state.chatWith, { id: 0, from: state.me.user, text, at: Date.now(), mine: true });
  $("chat-text").value = "";
});

// ---- calls ---------------------------------------------------------------------------

function dial(to) {
  if (!to) return;
  if (state.call) { notice("Hang up first"); return; }
  send({ type: "dial", to, id: state.nextId++ });
}

$("dial-form").addEventListener("submit", (e) => {
  e.preventDefault();
  dial($("dial-to").value.trim());
  $("dial-to").value = "";
});

$("answer").addEventListener("click", () => {
  if (state.ring) send({ type: "answer", call_id: state.ring.call_id });
});
$("reject").addEventListener("click", () => {
  if (!state.ring) return;
  send({ type: "reject", call_id: state.ring.call_id });
  state.ring = null;
  renderCall();
});
$("hangup").addEventListener("click", () => {
  if (!state.call) return;
  // The call is over for this device once it says so (no call_ended follows).
  send({ type: "hangup", call_id: state.call.call_id });
  state.call = null;
  microphone(false);
  renderCall();
  setTimeout(() => send({ type: "call_history", id: state.nextId++ }), 500);
});
$("mute").addEventListener("click", () => {
  if (!state.call) return;
  state.call.muted = !state.call.muted;
  if (state.mic) state.mic.enabled = !state.call.muted;
  renderCall();
});

// ---- media: one peer connection per session (docs/protocol.md, webrtc_offer) ------------

async function startMedia() {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    state.mic = stream.getAudioTracks()[0];
  } catch (e) {
    notice("No microphone: the other side will not hear you");
  }
  // A camera is looked for, not opened: it is opened for a video call and closed after.
  try {
    state.hasCamera = (await navigator.mediaDevices.enumerateDevices()).some((d) => d.kind === "videoinput");
  } catch (e) {
    state.hasCamera = false;
  }
  // Video calls ring this page only with a camera; Opus between browsers (the node keeps
  // G.711 toward gateways and other devices).
  send({ type: "capabilities", video: state.hasCamera, codecs: canChooseCodec() ? ["opus"] : [] });
  const pc = new RTCPeerConnection({ iceServers: [] });
  state.pc = pc;
  const transceiver = pc.addTransceiver("audio", { direction: "sendrecv" });
  state.sender = transceiver.sender;
  // Video as gateways offer it (VP8, H.264), passed through by the node: no
  // retransmission or FEC formats (the node relays RTP, it does not repair it).
  const video = pc.addTransceiver("video", { direction: state.hasCamera ? "sendrecv" : "recvonly" });
  state.videoSender = video.sender;
  if (video.setCodecPreferences && RTCRtpReceiver.getCapabilities) {
    const vc = RTCRtpReceiver.getCapabilities("video").codecs
      .filter((c) => /^video\/(VP8|H264)$/i.test(c.mimeType));
    if (vc.length) video.setCodecPreferences(vc);
  }
  // G.711 first (gateway calls need no transcoding), then Opus (calls between
  // browsers), and DTMF; nothing else (the node relays, it does not transcode).
  if (transceiver.setCodecPreferences && window.RTCRtpReceiver && RTCRtpReceiver.getCapabilities) {
    const codecs = RTCRtpReceiver.getCapabilities("audio").codecs;
    const pick = (re) => codecs.filter((c) => re.test(c.mimeType));
    const wanted = [...pick(/^audio\/PCMU$/i), ...pick(/^audio\/PCMA$/i), ...pick(/^audio\/opus$/i),
      ...pick(/^audio\/telephone-event$/i).filter((c) => c.clockRate === 8000 || c.clockRate === 48000)];
    if (wanted.length) transceiver.setCodecPreferences(wanted);
  }
  pc.ontrack = (ev) => {
    const el = ev.track.kind === "video" ? $("remote-video") : $("remote-audio");
    el.srcObject = new MediaStream([ev.track]);
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed") notice("Audio connection failed");
  };
  await pc.setLocalDescription(await pc.createOffer());
  // The node is ICE-lite and takes the offer whole: wait for the candidates (at most 3 s).
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && done());
    setTimeout(done, 3000);
  });
  send({ type: "webrtc_offer", sdp: pc.localDescription.sdp, id: state.nextId++ });
}

// Whether this browser sends Opus and lets a page pick the codec it sends per call
// (RTCRtpSender.setParameters with RTCRtpEncodingParameters.codec, Chromium 126 and
// later): only then does it declare Opus. A browser that refuses the choice on an Opus
// call is heard by nobody (the node drops a codec the call does not carry, and counts it).
function canChooseCodec() {
  return !!(window.RTCRtpSender && RTCRtpSender.getCapabilities && RTCRtpSender.prototype.setParameters &&
    RTCRtpSender.getCapabilities("audio").codecs.some((c) => /^audio\/opus$/i.test(c.mimeType)));
}

// Sends the call's codec (payload type from call_connected: 0 PCMU, 8 PCMA, 111 Opus).
async function sendCodec(pt) {
  const name = pt === 0 ? "audio/PCMU" : pt === 8 ? "audio/PCMA" : "audio/opus";
  const sender = state.sender;
  if (!sender) return;
  try {
    const params = sender.getParameters();
    const codec = (params.codecs || []).find((c) => c.mimeType.toLowerCase() === name.toLowerCase());
    if (!codec || !params.encodings || !params.encodings.length) return;
    params.encodings[0].codec = { mimeType: codec.mimeType, clockRate: codec.clockRate,
      channels: codec.channels, sdpFmtpLine: codec.sdpFmtpLine };
    await sender.setParameters(params);
  } catch (e) {
    // G.711 of the other law is converted by the node; say so in the console.
    console.warn("could not choose the sending codec " + name + ": " + e);
  }
}

// DTMF on the call (RFC 4733 through the node), from the keypad.
function sendDigit(d) {
  const dtmf = state.sender && state.sender.dtmf;
  // The call's far end must take telephone-event (call_connected says), and the browser
  // must be able to send it.
  if (!state.call || !state.call.dtmf || !dtmf || !dtmf.canInsertDTMF) {
    notice("Keypad tones are not available on this call");
    return;
  }
  dtmf.insertDTMF(d, 100, 70);
  $("keypad-digits").textContent = ($("keypad-digits").textContent + d).slice(-24);
}

$("keypad").addEventListener("click", () => {
  $("keypad-keys").hidden = !$("keypad-keys").hidden;
});
for (const d of "123456789*0#") {
  const b = document.createElement("button");
  b.textContent = d;
  b.id = "dtmf-" + (d === "*" ? "star" : d === "#" ? "pound" : d);
  b.addEventListener("click", () => sendDigit(d));
  $("keypad-grid").append(b);
}

// The camera is open only during a video call (its light off otherwise); the video
// view shows both sides.
async function camera(on) {
  $("video-view").hidden = !on;
  if (!on) {
    if (state.videoSender) state.videoSender.replaceTrack(null).catch(() => {});
    if (state.cam) state.cam.stop();
    state.cam = null;
    $("self-video").srcObject = null;
    return;
  }
  if (!state.hasCamera || state.cam) return;
  try {
    state.cam = (await navigator.mediaDevices.getUserMedia({ video: true })).getVideoTracks()[0];
  } catch (e) {
    notice("No camera: the other side will not see you");
    return;
  }
  // The call may have ended while the camera opened.
  if (!state.call || !state.call.video) { state.cam.stop(); state.cam = null; return; }
  $("self-video").srcObject = new MediaStream([state.cam]);
  if (state.videoSender) state.videoSender.replaceTrack(state.cam).catch(() => {});
}

// The microphone goes out only during a call.
function microphone(on) {
  if (!state.sender) return;
  if (state.mic) state.mic.enabled = true;
  state.sender.replaceTrack(on && state.mic ? state.mic : null).catch(() => {});
}

// Audio packets both ways, for the status line and for tests.
window.parleyMediaStats = async function () {
  const out = { inbound: 0, outbound: 0, state: state.pc ? state.pc.connectionState : "none",
    inCodec: null, outCodec: null, videoIn: 0, videoOut: 0 };
  if (!state.pc) return out;
  const stats = await state.pc.getStats();
  const codec = (id) => { const c = id && stats.get(id); return c ? c.mimeType : null; };
  stats.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") {
      out.inbound += r.packetsReceived || 0;
      out.inCodec = codec(r.codecId) || out.inCodec;
    }
    if (r.type === "inbound-rtp" && r.kind === "video") out.videoIn += r.packetsReceived || 0;
    if (r.type === "outbound-rtp" && r.kind === "video") out.videoOut += r.packetsSent || 0;
    if (r.type === "outbound-rtp" && r.kind === "audio") {
      out.outbound += r.packetsSent || 0;
      out.outCodec = codec(r.codecId) || out.outCodec;
    }
  });
  return out;
};

function renderCall() {
  const r = state.ring;
  $("ring").hidden = !r;
  if (r) {
    $("ring-from").textContent = r.from_name ? `${r.from_name} (${r.from})` : r.from;
    $("ring-detail").textContent = `calling ${r.to}` + (r.video ? " · video" : "");
  }
  const c = state.call;
  $("incall").hidden = !c;
  if (!c) { $("keypad-keys").hidden = true; $("keypad-digits").textContent = ""; }
  if (c) {
    $("call-peer").textContent = c.peer;
    $("call-state").textContent = c.state + (c.muted ? " · muted" : "");
    $("mute").textContent = c.muted ? "Unmute" : "Mute";
  }
}

setInterval(() => {
  const c = state.call;
  if (!c || !c.since) { $("call-timer").textContent = ""; return; }
  const s = Math.floor((Date.now() - c.since) / 1000);
  $("call-timer").textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}, 500);

// ---- call history --------------------------------------------------------------------

function renderHistory(calls) {
  const ul = $("history");
  ul.textContent = "";
  for (const c of calls) {
    const li = document.createElement("li");
    const kind = c.direction === "outgoing" ? "out" : c.answered ? "in" : "missed";
    const icon = document.createElement("span");
    icon.className = "history-" + kind;
    icon.textContent = kind === "out" ? "↗" : kind === "in" ? "↙" : "✕";
    const who = document.createElement("div");
    who.className = "who";
    const top = document.createElement("div");
    top.textContent = c.peer_name || c.peer;
    const sub = document.createElement("div");
    sub.className = "muted";
    const when = new Date(c.start_ms);
    sub.textContent = when.toLocaleString() + (c.answered ? ` · ${formatDuration(c.duration_s)}` : " · " + c.disposition.replace(/_/g, " "));
    who.append(top, sub);
    li.append(icon, who, button("Call", () => dial(c.peer)));
    ul.append(li);
  }
}

function formatDuration(s) {
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}
