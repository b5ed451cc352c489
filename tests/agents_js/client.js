// The SDK's own RealtimeSession over its OpenAIRealtimeWebRTC transport (or, with
// ?transport=websocket, OpenAIRealtimeWebSocket); the only change from a page written for OpenAI
// is the URL (and `useInsecureApiKey`, since our server takes its plain key).
const { RealtimeAgent, RealtimeSession, OpenAIRealtimeWebRTC, OpenAIRealtimeWebSocket, tool } = window.OpenAIAgentsRealtime;
const AUDIBLE_RMS = 0.01;

const state = {
  phase: "starting",
  errors: [],
  serverEvents: [],      // server event types, in order
  serverErrors: [],      // the server's `error` events
  clientEvents: [],      // what the SDK sent, in order
  history: [],           // session.history, summarised, after each update
  maxRms: 0,
  audibleFrames: 0,      // 20 ms analyser ticks above AUDIBLE_RMS
  audibleAfterText: 0,   // the same, counted after the typed message was sent
  callId: null,
  toolCalls: [],         // ?tools=1: the cities the page's get_weather tool was called with
  audioBytes: 0,         // WebSocket transport: reply audio received in `audio` events (PCM16)
  closed: false,
};
window.agentsTest = { state };

function summarise(item) {
  const content = (item.content || []).map((c) => ({ type: c.type, text: c.text ?? c.transcript ?? null }));
  return { itemId: item.itemId, type: item.type, role: item.role, status: item.status, content,
    name: item.name ?? null, arguments: item.arguments ?? null, output: item.output ?? null };
}

function hear(stream) {
  const el = document.getElementById("remote-audio");
  if (el.srcObject !== stream) el.srcObject = stream;
  el.play().catch(() => {});
  const ctx = new AudioContext();
  ctx.resume().catch(() => {});
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  setInterval(() => {
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (let i = 0; i < buf.length; i++) sum += buf[i] * buf[i];
    const rms = Math.sqrt(sum / buf.length);
    state.maxRms = Math.max(state.maxRms, rms);
    if (rms > AUDIBLE_RMS) {
      state.audibleFrames += 1;
      if (state.textSent) state.audibleAfterText += 1;
    }
  }, 20);
}

async function main() {
  const params = new URLSearchParams(location.search);
  // ?tools=1: a tool() whose execute runs here, in the page; the SDK's own loop calls it.
  const tools = params.get("tools") ? [tool({
    name: "get_weather",
    description: "The current weather in a city.",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"],
      additionalProperties: false },
    strict: true,
    execute: async ({ city }) => {
      state.toolCalls.push(city);
      // The session forced this tool for the question; the reply after it may answer freely.
      window.agentsTest.session.transport.sendEvent({ type: "session.update",
        session: { type: "realtime", tool_choice: "auto" } });
      return "Sunny, 21 degrees celsius.";
    },
  })] : [];
  const agent = new RealtimeAgent({
    name: "Assistant",
    instructions: "You are a helpful assistant. Answer in one short sentence.",
    tools,
  });
  const transport = params.get("transport") === "websocket"
    // WebSocket: the SDK authenticates with the `openai-insecure-api-key.KEY` subprotocol, and
    // reply audio arrives as PCM in `audio` events (the page would play it; here it is counted).
    ? new OpenAIRealtimeWebSocket({
      url: `${location.origin.replace(/^http/, "ws")}/v1/realtime?model=gpt-realtime`,
      useInsecureApiKey: true,
    })
    : new OpenAIRealtimeWebRTC({
      baseUrl: new URL("/v1/realtime/calls", location.origin).toString(),
      useInsecureApiKey: true,
      audioElement: document.getElementById("remote-audio"),
      changePeerConnection: async (pc) => {
        pc.addEventListener("track", (e) => hear(e.streams[0]));
        return pc;
      },
    });
  // Server-specific session fields go in the SDK's `providerData` (merged into session.update);
  // the test sends our TTS sampling cap (the random tiny checkpoint never stops) and a greedy LLM.
  const providerData = JSON.parse(params.get("provider_data") || "{}");
  const session = new RealtimeSession(agent, {
    transport, model: params.get("model") || "gpt-realtime", config: { providerData } });
  window.agentsTest.session = session;
  session.on("transport_event", (e) => {
    state.serverEvents.push(e.type);
    if (e.type === "error") state.serverErrors.push(JSON.stringify(e.error ?? e));
  });
  session.on("history_updated", (h) => { state.history = h.map(summarise); });
  session.on("audio", (e) => { state.audioBytes += e.data.byteLength; });
  session.on("error", (e) => state.errors.push(JSON.stringify(e.error ?? e)));
  const send = transport.sendEvent.bind(transport);
  transport.sendEvent = (event) => { state.clientEvents.push(event.type); return send(event); };
  await session.connect({ apiKey: params.get("key") || "unused" });
  state.callId = transport.callId;
  state.phase = "connected";
}

// Called by the test once the spoken turn is answered: a typed turn on the same session.
window.agentsTest.sendText = (text) => {
  state.textSent = true;
  window.agentsTest.session.sendMessage(text);
};

window.agentsTest.close = () => {
  window.agentsTest.session.close();
  state.closed = true;
};

main().catch((e) => { state.phase = "error"; state.errors.push(String(e?.stack ?? e)); });
