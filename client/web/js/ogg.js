// Ogg container for Opus (RFC 3533 pages, RFC 7845 Opus mapping): a page writer and a streaming page reader.

const OGG_CAPTURE = [0x4f, 0x67, 0x67, 0x53]; // "OggS"
const HEADER_BYTES = 27;
const FLAG_CONTINUED = 0x01;
const FLAG_BOS = 0x02;
const FLAG_EOS = 0x04;

let crcTable = null;

/** CRC-32 of Ogg: polynomial 0x04c11db7, not reflected, initial value 0, no final xor. */
export function oggCrc32(bytes) {
  if (crcTable === null) {
    crcTable = new Uint32Array(256);
    for (let i = 0; i < 256; i++) {
      let r = i << 24;
      for (let bit = 0; bit < 8; bit++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
      crcTable[i] = r >>> 0;
    }
  }
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ crcTable[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc;
}

/** Lacing values of one packet: as many 255s as fit, then the remainder (0 when the length is a multiple of 255). */
function lacingOf(length) {
  const values = new Array(Math.floor(length / 255)).fill(255);
  values.push(length % 255);
  return values;
}

/** Writes Ogg pages of one logical stream; every packet given ends on its page. */
export class OggPageWriter {
  constructor(serial = (Math.random() * 0xffffffff) >>> 0) {
    this.serial = serial >>> 0;
    this.sequence = 0;
  }

  /** One page holding whole `packets` (Uint8Array[]), ending at `granule` (48 kHz samples for Opus). */
  page(packets, granule, { bos = false, eos = false } = {}) {
    const lacing = packets.flatMap((p) => lacingOf(p.length));
    if (lacing.length > 255) throw new RangeError(`Ogg page would need ${lacing.length} segments (max 255)`);
    const bodyLength = packets.reduce((n, p) => n + p.length, 0);
    const page = new Uint8Array(HEADER_BYTES + lacing.length + bodyLength);
    const view = new DataView(page.buffer);
    page.set(OGG_CAPTURE, 0);
    page[4] = 0; // stream structure version
    page[5] = (bos ? FLAG_BOS : 0) | (eos ? FLAG_EOS : 0);
    view.setBigInt64(6, BigInt(granule), true);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.sequence++, true);
    view.setUint32(22, 0, true); // CRC, filled below
    page[26] = lacing.length;
    page.set(lacing, HEADER_BYTES);
    let offset = HEADER_BYTES + lacing.length;
    for (const p of packets) {
      page.set(p, offset);
      offset += p.length;
    }
    view.setUint32(22, oggCrc32(page), true);
    return page;
  }
}

function matchesCapture(bytes, at) {
  return OGG_CAPTURE.every((b, i) => bytes[at + i] === b);
}

/**
 * Streaming Ogg reader: push bytes in any split, get back the complete packets.
 * Packets may span pages (lacing 255 at a page end); pages with a bad CRC are dropped and counted.
 */
export class OggPageReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // segments of a packet continued on the next page
    this.pages = 0;
    this.crcErrors = 0;
    this.skippedBytes = 0;
  }

  /** Append bytes; returns [{packet, granule, pageIndex, bos, eos}] for every packet completed. */
  push(bytes) {
    const merged = new Uint8Array(this.buffer.length + bytes.length);
    merged.set(this.buffer, 0);
    merged.set(bytes, this.buffer.length);
    const packets = [];
    let at = 0;
    while (true) {
      at = this.#syncFrom(merged, at);
      const page = this.#pageAt(merged, at);
      if (page === null) break;
      at += page.length;
      if (page.valid) this.#collect(page, packets);
    }
    this.buffer = merged.slice(at);
    return packets;
  }

  /** Index of the next "OggS" from `at` (or of the last bytes that might begin one). */
  #syncFrom(bytes, at) {
    let i = at;
    while (i + 4 <= bytes.length && !matchesCapture(bytes, i)) i++;
    if (i + 4 > bytes.length) i = Math.max(at, bytes.length - 3);
    this.skippedBytes += i - at;
    return i;
  }

  /** The page starting at `at`, or null while it is still incomplete. */
  #pageAt(bytes, at) {
    if (at + HEADER_BYTES > bytes.length || !matchesCapture(bytes, at)) return null;
    const segments = bytes[at + 26];
    if (at + HEADER_BYTES + segments > bytes.length) return null;
    const lacing = bytes.subarray(at + HEADER_BYTES, at + HEADER_BYTES + segments);
    const bodyLength = lacing.reduce((n, v) => n + v, 0);
    const length = HEADER_BYTES + segments + bodyLength;
    if (at + length > bytes.length) return null;
    const raw = bytes.slice(at, at + length);
    const view = new DataView(raw.buffer);
    const crc = view.getUint32(22, true);
    view.setUint32(22, 0, true);
    const valid = oggCrc32(raw) === crc;
    if (!valid) this.crcErrors++;
    return {
      length,
      valid,
      flags: raw[5],
      granule: view.getBigInt64(6, true),
      lacing,
      body: raw.subarray(HEADER_BYTES + segments),
    };
  }

  #collect(page, packets) {
    const index = this.pages++;
    if (!(page.flags & FLAG_CONTINUED)) this.partial = [];
    let offset = 0;
    for (let s = 0; s < page.lacing.length; s++) {
      const size = page.lacing[s];
      this.partial.push(page.body.subarray(offset, offset + size));
      offset += size;
      if (size < 255) {
        packets.push({
          packet: concatBytes(this.partial),
          granule: page.granule,
          pageIndex: index,
          bos: (page.flags & FLAG_BOS) !== 0,
          eos: (page.flags & FLAG_EOS) !== 0,
        });
        this.partial = [];
      }
    }
  }
}

export function concatBytes(chunks) {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let offset = 0;
  for (const c of chunks) {
    out.set(c, offset);
    offset += c.length;
  }
  return out;
}
