// Opus in Ogg with WebCodecs: mic PCM -> Ogg pages (OggOpusEncoder), Ogg bytes -> PCM (OggOpusDecoder).

import { OggPageReader, OggPageWriter } from "./ogg.js";

export const SAMPLE_RATE = 24000;
const GRANULE_RATE = 48000; // Ogg Opus granule positions always count 48 kHz samples
const PRE_SKIP = 312; // libopus look-ahead (6.5 ms) at 48 kHz
const ENCODER_CONFIG = {
  codec: "opus",
  sampleRate: SAMPLE_RATE,
  numberOfChannels: 1,
  bitrate: 48000,
  opus: { frameDuration: 20000, application: "audio", signal: "voice", usedtx: false },
};

/** The OpusHead identification header (RFC 7845 §5.1), mono, mapping family 0. */
export function opusHead(inputSampleRate = SAMPLE_RATE, preSkip = PRE_SKIP) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(new TextEncoder().encode("OpusHead"), 0);
  head[8] = 1; // version
  head[9] = 1; // channels
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputSampleRate, true);
  view.setInt16(16, 0, true); // output gain
  head[18] = 0; // channel mapping family
  return head;
}

/** The OpusTags comment header (RFC 7845 §5.2) with a vendor string and no comments. */
export function opusTags(vendor = "duplex-web") {
  const vendorBytes = new TextEncoder().encode(vendor);
  const tags = new Uint8Array(8 + 4 + vendorBytes.length + 4);
  const view = new DataView(tags.buffer);
  tags.set(new TextEncoder().encode("OpusTags"), 0);
  view.setUint32(8, vendorBytes.length, true);
  tags.set(vendorBytes, 12);
  view.setUint32(12 + vendorBytes.length, 0, true);
  return tags;
}

function startsWithAscii(bytes, text) {
  return bytes.length >= text.length && [...text].every((ch, i) => bytes[i] === ch.charCodeAt(0));
}

/** Duration of one Opus packet in 48 kHz samples, from its TOC byte (RFC 6716 §3.1); 0 if malformed. */
export function opusPacketSamples48k(packet) {
  if (packet.length < 1) return 0;
  const config = packet[0] >> 3;
  let frameSamples;
  if (config < 12) frameSamples = [480, 960, 1920, 2880][config & 3];
  else if (config < 16) frameSamples = [480, 960][config & 1];
  else frameSamples = [120, 240, 480, 960][config & 3];
  const code = packet[0] & 3;
  if (code === 0) return frameSamples;
  if (code === 1 || code === 2) return 2 * frameSamples;
  return packet.length < 2 ? 0 : (packet[1] & 0x3f) * frameSamples;
}

/** True when this browser can encode and decode 24 kHz mono Opus with WebCodecs. */
export async function webCodecsOpusSupported() {
  if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") return false;
  try {
    const enc = await AudioEncoder.isConfigSupported(ENCODER_CONFIG);
    const dec = await AudioDecoder.isConfigSupported({ codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 });
    return Boolean(enc.supported && dec.supported);
  } catch {
    return false;
  }
}

/** Mono 24 kHz Float32 PCM in, one Ogg page per Opus packet out (via `onPage(Uint8Array)`). */
export class OggOpusEncoder {
  constructor(onPage, onError) {
    this.onPage = onPage;
    this.writer = new OggPageWriter();
    this.granule = 0;
    this.samplesIn = 0;
    this.packets = 0;
    this.encoder = new AudioEncoder({ output: (chunk) => this.#onChunk(chunk), error: onError });
    this.encoder.configure(ENCODER_CONFIG);
  }

  /** The two header pages (OpusHead, OpusTags); send them before any audio page. */
  headerPages() {
    return [this.writer.page([opusHead()], 0, { bos: true }), this.writer.page([opusTags()], 0)];
  }

  encode(samples) {
    const data = new AudioData({
      format: "f32-planar",
      sampleRate: SAMPLE_RATE,
      numberOfFrames: samples.length,
      numberOfChannels: 1,
      timestamp: Math.round((this.samplesIn * 1e6) / SAMPLE_RATE),
      data: samples,
    });
    this.samplesIn += samples.length;
    this.encoder.encode(data);
    data.close();
  }

  #onChunk(chunk) {
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    const duration = opusPacketSamples48k(packet) || Math.round((chunk.duration * GRANULE_RATE) / 1e6);
    this.granule += duration;
    this.packets++;
    this.onPage(this.writer.page([packet], this.granule));
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

/** Ogg Opus bytes in (any split), decoded Float32 PCM out via `onPcm(samples, sampleRate)`. */
export class OggOpusDecoder {
  constructor(onPcm, onError) {
    this.onPcm = onPcm;
    this.onError = onError;
    this.reader = new OggPageReader();
    this.decoder = null;
    this.timestamp = 0;
    this.packetsIn = 0;
    this.samplesOut = 0;
  }

  /** Feed bytes; returns the duration (48 kHz samples) of the audio packets found in them. */
  push(bytes) {
    let samples48k = 0;
    for (const { packet } of this.reader.push(bytes)) {
      if (startsWithAscii(packet, "OpusHead")) this.#configure(packet);
      else if (startsWithAscii(packet, "OpusTags")) continue;
      else samples48k += this.#decode(packet);
    }
    return samples48k;
  }

  #configure(head) {
    if (this.decoder !== null) this.decoder.close();
    this.decoder = new AudioDecoder({ output: (data) => this.#onData(data), error: this.onError });
    this.decoder.configure({ codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1, description: head });
  }

  #decode(packet) {
    if (this.decoder === null) this.#configure(opusHead(SAMPLE_RATE, 0));
    const duration = opusPacketSamples48k(packet);
    if (duration === 0) return 0;
    this.packetsIn++;
    this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data: packet }));
    this.timestamp += Math.round((duration * 1e6) / GRANULE_RATE);
    return duration;
  }

  #onData(data) {
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    this.samplesOut += samples.length;
    this.onPcm(samples, data.sampleRate);
    data.close();
  }

  close() {
    if (this.decoder !== null && this.decoder.state !== "closed") this.decoder.close();
  }
}
