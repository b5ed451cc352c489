// fishvoice browser client: one WebRTC call to /v1/realtime/calls (the OpenAI Realtime shape),
// microphone up, the agent's voice down, JSON events on the "oai-events" data channel.
// Plain JS, no build step. Test hooks: window.fishvoice.state (read-only use).
"use strict";

const $ = (id) => document.getElementById(id);
const AUDIBLE_RMS = 0.01;

const state = {
  phase: "idle",          // idle | connecting | connected | ended | error
  status: "",
  callId: null,
  events: [],             // every server event, as received
  errors: [],             // error events and client-side failures (strings)
  userTranscripts: [],    // what the server heard
  agentTranscripts: [],   // what the agent said (final text per response)
  maxRms: 0,              // loudest 20 ms of received audio
  audibleFrames: 0,       // 20 ms analyser ticks above AUDIBLE_RMS
  latency: {},            // last measured values in ms
};
window.fishvoice = { state };

let pc = null;
let dc = null;
let micStream = null;
let callUrl = null;
let audioCtx = null;
let analyser = null;
let meterTimer = null;
let pingTimer = null;
let hangingUp = false;
// Latency clocks: started at the end of the user's speech (speech_stopped) or at a TTS request,
// armed when the server starts that response's audio (so the tail of an earlier reply does not
// count), stopped by the first audible 20 ms of received audio.
let pendingTurn = null;   // {t, armed}
let pendingTts = null;    // {t, armed}
const agentLines = new Map();  // response id -> <li>
const responseKinds = new Map();  // response id -> "agent" | "tts"

// ------------------------------------------------------------------ small helpers
function setStatus(text, kind = "idle") {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + kind;
  state.status = text;
}

function fail(text) {
  state.errors.push(text);
  setStatus(text, "error");
}

function apiKey() { return $("api-key").value.trim(); }

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

function selectedMode() { return document.querySelector("input[name=mode]:checked").value; }

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error.message || JSON.stringify(body.error);
    if (body && body.message) return body.message;  // the references API's {success, message}
    return JSON.stringify(body);
  } catch (_) {
    return resp.status + " " + resp.statusText;
  }
}

function serverDown() {
  return "Cannot reach the server at " + location.origin + ". Is it running? (Start it, then press Call again.)";
}

function addLine(kind, text, who) {
  const li = document.createElement("li");
  li.className = kind;
  if (who) {
    const label = document.createElement("span");
    label.className = "who";
    label.textContent = who;
    li.appendChild(label);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.appendChild(body);
  $("transcript").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function setLineText(li, text) { li.querySelector(".text").textContent = text; }

function showLatency(id, ms) {
  $(id).textContent = ms == null ? "–" : Math.round(ms) + " ms";
}

function send(event) {
  if (dc && dc.readyState === "open") dc.send(JSON.stringify(event));
}

// ------------------------------------------------------------------ the call
function callQuery() {
  // The page's own query string passes through (e.g. ?max_new_tokens=200&silence_duration_ms=700).
  const q = new URLSearchParams(location.search);
  q.set("mode", selectedMode());
  const voice = $("voice").value;
  if (voice) q.set("voice", voice); else q.delete("voice");
  const instructions = $("instructions").value.trim();
  if (instructions) q.set("instructions", instructions);
  return q.toString();
}

async function fetchConfig() {
  let resp;
  try {
    resp = await fetch("/v1/realtime/config", { headers: headers() });
  } catch (_) {
    throw new Error(serverDown());
  }
  if (resp.status === 401) throw new Error("The server needs an API key: open Settings, enter it, and press Call again.");
  if (!resp.ok) throw new Error("The server refused the call set-up: " + (await errorText(resp)));
  return resp.json();
}

function gatheringComplete(peer, timeoutMs) {
  // The server answers once (no trickle ICE), so send the offer with every candidate in it.
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { peer.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (peer.iceGatheringState === "complete") done(); };
    peer.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

async function startCall() {
  if (pc) return;
  hangingUp = false;
  state.phase = "connecting";
  $("call").disabled = true;
  setStatus("Asking for the microphone…", "busy");
  if (!window.isSecureContext || !navigator.mediaDevices) {
    fail("Browsers only allow the microphone on secure pages: open this page over HTTPS, or at http://localhost on the server's machine.");
    state.phase = "error";
    $("call").disabled = false;
    return;
  }
  try {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (err) {
    const denied = err && (err.name === "NotAllowedError" || err.name === "SecurityError");
    const missing = err && (err.name === "NotFoundError" || err.name === "OverconstrainedError");
    fail(denied ? "Microphone access was denied. Allow the microphone for this site (the icon in the address bar), then press Call again."
      : missing ? "No microphone was found. Plug one in, then press Call again."
      : "The microphone could not be opened: " + (err && err.message ? err.message : err));
    state.phase = "error";
    $("call").disabled = false;
    return;
  }
  try {
    setStatus("Connecting…", "busy");
    const config = await fetchConfig();
    pc = new RTCPeerConnection({ iceServers: config.ice_servers || [] });
    micStream.getAudioTracks().forEach((track) => pc.addTrack(track, micStream));
    dc = pc.createDataChannel("oai-events");
    dc.onopen = onChannelOpen;
    dc.onmessage = (msg) => { try { onEvent(JSON.parse(msg.data)); } catch (e) { console.error(e); } };
    dc.onclose = () => { if (!hangingUp && pc) callDropped("The server ended the call."); };
    pc.ontrack = (ev) => attachRemoteAudio(ev.streams[0] || new MediaStream([ev.track]));
    pc.onconnectionstatechange = onConnectionState;

    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc, 3000);
    let resp;
    try {
      resp = await fetch("/v1/realtime/calls?" + callQuery(), {
        method: "POST", body: pc.localDescription.sdp, headers: headers({ "Content-Type": "application/sdp" }),
      });
    } catch (_) {
      throw new Error(serverDown());
    }
    if (resp.status === 401) throw new Error("The server needs an API key: open Settings, enter it, and press Call again.");
    if (resp.status === 503) throw new Error("The server is busy: " + (await errorText(resp)));
    if (resp.status !== 201) throw new Error("The call was refused: " + (await errorText(resp)));
    callUrl = resp.headers.get("Location");
    state.callId = callUrl ? callUrl.split("/").pop() : null;
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    $("hangup").disabled = false;
    $("mute").disabled = false;
  } catch (err) {
    fail(err.message || String(err));
    state.phase = "error";
    teardown();
  }
}

function onChannelOpen() {
  state.phase = "connected";
  setStatus(selectedMode() === "agent" ? "Connected. Speak: the agent is listening." : "Connected. Type text to hear it spoken.", "ok");
  for (const id of ["send-text", "tts-speak", "stop-speaking"]) $(id).disabled = false;
  // Keepalive, so the server knows the page is still there even while the mic is muted.
  pingTimer = setInterval(() => { if (dc && dc.readyState === "open") dc.send("ping"); }, 1000);
}

function onConnectionState() {
  if (!pc) return;
  const s = pc.connectionState;
  if (s === "failed") callDropped("The call dropped: the connection to the server was lost.");
  else if (s === "disconnected") setStatus("Connection unstable, trying to recover…", "busy");
  else if (s === "connected" && state.phase === "connected") setStatus("Connected.", "ok");
}

function callDropped(text) {
  if (hangingUp) return;
  fail(text + " Press Call to start again.");
  state.phase = "ended";
  teardown();
}

async function hangUp() {
  hangingUp = true;
  const url = callUrl;
  $("hangup").disabled = true;
  if (url) {
    // Tell the server first, so it ends the call cleanly instead of waiting for the peer to vanish.
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 2000);
    try {
      await fetch(url, { method: "DELETE", headers: headers(), signal: abort.signal });
    } catch (_) { /* the server is gone or slow; closing the connection ends the call anyway */ }
    clearTimeout(timer);
  }
  teardown();
  state.phase = "ended";
  setStatus("Call ended.", "idle");
}

function teardown() {
  clearInterval(pingTimer); pingTimer = null;
  clearInterval(meterTimer); meterTimer = null;
  if (dc) { dc.onclose = null; try { dc.close(); } catch (_) {} }
  if (pc) { pc.onconnectionstatechange = null; try { pc.close(); } catch (_) {} }
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (audioCtx) { audioCtx.close().catch(() => {}); }
  pc = dc = micStream = audioCtx = analyser = null;
  callUrl = null;
  $("call").disabled = false;
  for (const id of ["hangup", "mute", "send-text", "tts-speak", "stop-speaking"]) $(id).disabled = true;
  $("mute").setAttribute("aria-pressed", "false");
  $("mute").textContent = "Mute";
  $("meter-bar").style.width = "0";
}

function toggleMute() {
  if (!micStream) return;
  const track = micStream.getAudioTracks()[0];
  track.enabled = !track.enabled;
  $("mute").setAttribute("aria-pressed", String(!track.enabled));
  $("mute").textContent = track.enabled ? "Mute" : "Unmute";
}

// ------------------------------------------------------------------ received audio
function attachRemoteAudio(stream) {
  const el = $("remote-audio");
  el.srcObject = stream;  // Chrome feeds remote WebRTC audio to WebAudio only while an element plays it
  el.play().catch(() => {});
  audioCtx = new AudioContext();
  audioCtx.resume().catch(() => {});
  analyser = audioCtx.createAnalyser();
  analyser.fftSize = 1024;
  audioCtx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  meterTimer = setInterval(() => {
    if (!analyser) return;
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
    const rms = Math.sqrt(sum / buf.length);
    state.maxRms = Math.max(state.maxRms, rms);
    $("meter-bar").style.width = Math.min(100, rms * 400) + "%";
    if (rms <= AUDIBLE_RMS) return;
    state.audibleFrames += 1;
    const now = performance.now();
    if (pendingTurn && pendingTurn.armed) {
      state.latency.heard_ms = now - pendingTurn.t;
      showLatency("lat-client", state.latency.heard_ms);
      pendingTurn = null;
    }
    if (pendingTts && pendingTts.armed) {
      state.latency.tts_heard_ms = now - pendingTts.t;
      showLatency("lat-tts", state.latency.tts_heard_ms);
      pendingTts = null;
    }
  }, 20);
}

// ------------------------------------------------------------------ server events
function onEvent(e) {
  state.events.push(e);
  switch (e.type) {
    case "session.created":
    case "session.updated":
      state.session = e.session;
      break;
    case "input_audio_buffer.speech_started":
      setStatus("Listening…", "ok");
      break;
    case "input_audio_buffer.speech_stopped":
      pendingTurn = { t: performance.now(), armed: false };
      setStatus("Thinking…", "busy");
      break;
    case "conversation.item.input_audio_transcription.completed":
      if (e.transcript && e.transcript.trim()) {
        state.userTranscripts.push(e.transcript);
        addLine("user", e.transcript, "you (heard)");
      }
      if (!(e.transcript || "").trim()) pendingTurn = null;
      break;
    case "conversation.item.added":
      if (e.item && e.item.role === "user") {
        const text = (e.item.content || []).map((c) => c.text || "").join(" ");
        addLine("user", text, "you (typed)");
      }
      break;
    case "response.created": {
      const tts = e.response && e.response.kind === "tts";
      responseKinds.set(e.response_id, tts ? "tts" : "agent");
      agentLines.set(e.response_id, addLine("agent", "…", tts ? "agent (TTS)" : "agent"));
      break;
    }
    case "response.output_audio_transcript.delta": {
      const li = agentLines.get(e.response_id);
      if (li) {
        const el = li.querySelector(".text");
        el.textContent = (el.textContent === "…" ? "" : el.textContent) + e.delta;
      }
      break;
    }
    case "response.output_audio_transcript.done": {
      const li = agentLines.get(e.response_id);
      if (li && e.transcript != null) setLineText(li, e.transcript || "…");
      break;
    }
    case "output_audio_buffer.started": {
      const lat = e.latency_ms || {};
      if (responseKinds.get(e.response_id) === "tts") {
        if (pendingTts) pendingTts.armed = true;
        state.latency.tts_server_first_audio_ms = lat.first_audio;
        showLatency("lat-tts-server", lat.first_audio);
      } else if (lat.transcript != null) {  // a reply to a spoken turn (latency counts from its end)
        if (pendingTurn) pendingTurn.armed = true;
        state.latency.server_first_audio_ms = lat.first_audio;
        showLatency("lat-server", lat.first_audio);
        const parts = [lat.transcript, lat.first_token].map((v) => (v == null ? "–" : Math.round(v) + " ms"));
        $("lat-parts").textContent = parts.join(" / ");
      }
      setStatus("Speaking…", "ok");
      break;
    }
    case "output_audio_buffer.cleared": {
      const li = agentLines.get(e.response_id);
      if (li) li.classList.add("interrupted");
      break;
    }
    case "output_audio_buffer.stopped":
      if (state.phase === "connected") setStatus("Connected.", "ok");
      break;
    case "response.done": {
      const li = agentLines.get(e.response_id);
      const status = e.response && e.response.status;
      if (li) {
        if (e.transcript != null) setLineText(li, e.transcript || "(nothing was said)");
        if (status === "cancelled") li.classList.add("interrupted");
      }
      if (e.transcript) state.agentTranscripts.push(e.transcript);
      if (status === "failed") {
        const err = e.response.status_details && e.response.status_details.error;
        fail("The reply failed: " + (err ? err.message : "unknown error"));
      }
      break;
    }
    case "error":
      state.errors.push(e.error ? e.error.message : JSON.stringify(e));
      setStatus("Server: " + (e.error ? e.error.message : "error"), "error");
      break;
    default:
      break;
  }
}

// ------------------------------------------------------------------ typing and TTS
function sendText(ev) {
  ev.preventDefault();
  const text = $("text-input").value.trim();
  if (!text) return;
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  send({ type: "response.create" });
  if (selectedMode() === "tts") pendingTts = { t: performance.now(), armed: false };
  $("text-input").value = "";
}

function speakText() {
  const text = $("tts-text").value.trim();
  if (!text) { setStatus("Type something to speak first.", "busy"); return; }
  const event = { type: "tts.request", text };
  if ($("voice").value) event.voice = $("voice").value;
  pendingTts = { t: performance.now(), armed: false };
  send(event);
}

function stopSpeaking() {
  send({ type: "response.cancel" });
  send({ type: "output_audio_buffer.clear" });
}

function onModeChange() {
  if (dc && dc.readyState === "open") send({ type: "session.update", session: { mode: selectedMode() } });
}

function onVoiceChange() {
  if (dc && dc.readyState === "open" && $("voice").value) {
    send({ type: "session.update", session: { voice: $("voice").value } });
  }
}

// ------------------------------------------------------------------ reference voices
function voiceIds(body) {
  if (Array.isArray(body)) return body.map((v) => (typeof v === "string" ? v : v.id || v.reference_id || v.name));
  if (body && Array.isArray(body.reference_ids)) return body.reference_ids;
  if (body && Array.isArray(body.references)) return voiceIds(body.references);
  if (body && Array.isArray(body.voices)) return voiceIds(body.voices);
  return [];
}

async function loadVoices(select) {
  let resp;
  try {
    resp = await fetch("/v1/references/list?format=json", { headers: headers({ Accept: "application/json" }) });
  } catch (_) {
    return;  // the server is down; the call button says so when used
  }
  if (!resp.ok) return;
  const ids = voiceIds(await resp.json()).filter(Boolean);
  const box = $("voice");
  const keep = select || box.value;
  box.innerHTML = "";
  box.appendChild(new Option("Default voice", ""));
  for (const id of ids) box.appendChild(new Option(id, id));
  if (ids.includes(keep)) box.value = keep;
}

let recorder = null;
let recorded = null;

async function toggleRecording() {
  if (recorder && recorder.state === "recording") { recorder.stop(); return; }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    $("ref-status").textContent = "Microphone access was denied; choose a file instead.";
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    recorded = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
    const preview = $("ref-preview");
    preview.src = URL.createObjectURL(recorded);
    preview.hidden = false;
    $("ref-record").textContent = "Record again";
    $("ref-status").textContent = "Recorded " + Math.round(recorded.size / 1024) + " KB. Type its transcript, then upload.";
  };
  recorder.start();
  $("ref-record").textContent = "Stop recording";
  $("ref-status").textContent = "Recording… say a sentence or two, then stop.";
}

async function uploadVoice() {
  const id = $("ref-id").value.trim();
  const text = $("ref-text").value.trim();
  const file = $("ref-file").files[0];
  const audio = file || recorded;
  const status = $("ref-status");
  if (!id) { status.textContent = "Give the voice a name."; return; }
  if (!audio) { status.textContent = "Choose an audio file or record one."; return; }
  if (!text) { status.textContent = "Type the transcript of the audio (it guides the voice cloning)."; return; }
  const form = new FormData();
  form.append("id", id);
  form.append("text", text);
  form.append("audio", audio, file ? file.name : "recording.webm");
  status.textContent = "Uploading…";
  let resp;
  try {
    resp = await fetch("/v1/references/add?format=json", { method: "POST", body: form, headers: headers({ Accept: "application/json" }) });
  } catch (_) {
    status.textContent = serverDown();
    return;
  }
  if (!resp.ok) { status.textContent = "Upload failed: " + (await errorText(resp)); return; }
  status.textContent = "Voice “" + id + "” added.";
  await loadVoices(id);
  onVoiceChange();
}

// ------------------------------------------------------------------ wiring
function init() {
  const saved = localStorage.getItem("fishvoice.apiKey");
  if (saved) $("api-key").value = saved;
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("fishvoice.apiKey", apiKey());
    loadVoices();
  });
  const params = new URLSearchParams(location.search);
  if (params.get("mode") === "tts") document.querySelector("input[name=mode][value=tts]").checked = true;
  $("call").addEventListener("click", startCall);
  $("hangup").addEventListener("click", hangUp);
  $("mute").addEventListener("click", toggleMute);
  $("text-form").addEventListener("submit", sendText);
  $("tts-speak").addEventListener("click", speakText);
  $("stop-speaking").addEventListener("click", stopSpeaking);
  $("refresh-voices").addEventListener("click", () => loadVoices());
  $("voice").addEventListener("change", onVoiceChange);
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", onModeChange));
  $("ref-record").addEventListener("click", toggleRecording);
  $("ref-upload").addEventListener("click", uploadVoice);
  window.addEventListener("pagehide", () => {
    if (callUrl) fetch(callUrl, { method: "DELETE", headers: headers(), keepalive: true }).catch(() => {});
  });
  loadVoices(params.get("voice"));
}

init();
