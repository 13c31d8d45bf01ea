// The Kyutai binary websocket protocol: every message is one kind byte followed by its payload.

export const Kind = Object.freeze({
  HANDSHAKE: 0,
  AUDIO: 1,
  TEXT: 2,
  CONTROL: 3,
  METADATA: 4,
  ERROR: 5,
  PING: 6,
});

/** Sampling parameters the server understands, with the input type used to validate them. */
export const SAMPLING_PARAMS = Object.freeze([
  { name: "text_temperature", label: "Text temperature", kind: "float", min: 0, max: 5, step: 0.05 },
  { name: "text_topk", label: "Text top-k", kind: "int", min: 1, max: 10000, step: 1 },
  { name: "audio_temperature", label: "Audio temperature", kind: "float", min: 0, max: 5, step: 0.05 },
  { name: "audio_topk", label: "Audio top-k", kind: "int", min: 1, max: 10000, step: 1 },
  { name: "text_seed", label: "Text seed", kind: "int", min: 0, max: 2 ** 31 - 1, step: 1 },
  { name: "audio_seed", label: "Audio seed", kind: "int", min: 0, max: 2 ** 31 - 1, step: 1 },
]);

const decoder = new TextDecoder();

/** One message to send: kind byte + payload bytes. */
export function encodeMessage(kind, payload = new Uint8Array(0)) {
  const message = new Uint8Array(1 + payload.length);
  message[0] = kind;
  message.set(payload, 1);
  return message;
}

/**
 * A received message as {kind, ...}: handshake {protocolVersion, modelVersion}, audio {bytes},
 * text/error {text}, metadata {data} (parsed JSON, or {raw} when it is not JSON), others {bytes}.
 */
export function decodeMessage(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length === 0) return { kind: -1, bytes };
  const kind = bytes[0];
  const payload = bytes.subarray(1);
  switch (kind) {
    case Kind.HANDSHAKE: {
      const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
      return {
        kind,
        protocolVersion: payload.length >= 4 ? view.getUint32(0, true) : 0,
        modelVersion: payload.length >= 8 ? view.getUint32(4, true) : 0,
      };
    }
    case Kind.TEXT:
    case Kind.ERROR:
      return { kind, text: decoder.decode(payload) };
    case Kind.METADATA: {
      const raw = decoder.decode(payload);
      try {
        return { kind, data: JSON.parse(raw) };
      } catch {
        return { kind, data: { raw } };
      }
    }
    default:
      return { kind, bytes: payload };
  }
}

/** Validated query string for the chat endpoint; empty values are left to the server's defaults. */
export function samplingQuery(values) {
  const query = new URLSearchParams();
  for (const param of SAMPLING_PARAMS) {
    const raw = values[param.name];
    if (raw === undefined || raw === null || String(raw).trim() === "") continue;
    const number = Number(raw);
    if (!Number.isFinite(number) || (param.kind === "int" && !Number.isInteger(number))) {
      throw new RangeError(`${param.label} must be ${param.kind === "int" ? "a whole number" : "a number"}`);
    }
    if (number < param.min || number > param.max) {
      throw new RangeError(`${param.label} must be between ${param.min} and ${param.max}`);
    }
    query.set(param.name, plainDecimal(number));
  }
  if (values.adapter) query.set("adapter", String(values.adapter));  // a LoRA adapter of the server
  return query;
}

/** A number as the server accepts it: ASCII digits and an optional ".", never an exponent (1e-7). */
export function plainDecimal(number) {
  if (Number.isInteger(number)) return BigInt(number).toString();
  return number.toFixed(12).replace(/0+$/, "").replace(/\.$/, "");
}

/** The websocket URL of the chat endpoint on the server that served this page. */
export function chatUrl(location, query) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const search = query.toString();
  return `${scheme}//${location.host}/api/chat${search ? `?${search}` : ""}`;
}
