"""The page's audio plumbing, run in headless Chromium against a static server (no duplex server needed):
Ogg/Opus muxing checked by sphn and an independent Ogg parser, Ogg/Opus parsing of sphn's stream, the resampler,
the jitter buffer and the protocol helpers."""

from __future__ import annotations

import numpy as np
import pytest
import sphn
from web_support import (
    chromium,
    dominant_frequency,
    split_ogg_pages,
    static_server,
    write_fake_mic_wav,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    wav = write_fake_mic_wav(tmp_path_factory.mktemp("mic") / "mic.wav", seconds=1.0)
    with static_server() as base, chromium(wav) as browser:
        tab = browser.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto(base)
        tab.wait_for_selector("body[data-ready=true]")
        yield tab
        assert not errors, f"page errors: {errors}"


ENCODE_TONE = """async ({seconds, frequency}) => {
  const { OggOpusEncoder } = await import('/js/opus.js');
  const pages = [];
  const encoder = new OggOpusEncoder((p) => pages.push(Array.from(p)), (e) => { throw e; });
  const headers = encoder.headerPages().map((p) => Array.from(p));
  const block = 480;
  for (let start = 0; start < seconds * 24000; start += block) {
    const samples = new Float32Array(block);
    for (let i = 0; i < block; i++) samples[i] = 0.5 * Math.sin(2 * Math.PI * frequency * (start + i) / 24000);
    encoder.encode(samples);
  }
  await encoder.encoder.flush();
  encoder.close();
  return { headers, pages };
}"""


def test_ogg_opus_encoder_pages_are_valid_and_decode_with_sphn(page):
    result = page.evaluate(ENCODE_TONE, {"seconds": 1.0, "frequency": 440.0})
    header_bytes = b"".join(bytes(p) for p in result["headers"])
    audio_pages = [bytes(p) for p in result["pages"]]
    assert len(audio_pages) in (50, 51), "one page per 20 ms Opus packet (+1 for the flushed look-ahead)"
    pages = split_ogg_pages(header_bytes + b"".join(audio_pages))
    assert all(p["crc_ok"] for p in pages), "every page carries Ogg's CRC-32"
    assert pages[0]["flags"] == 0x02 and pages[0]["packets"][0][:8] == b"OpusHead"
    assert pages[1]["packets"][0][:8] == b"OpusTags"
    assert [p["sequence"] for p in pages] == list(range(len(pages)))
    assert len({p["serial"] for p in pages}) == 1
    assert [p["granule"] for p in pages[2:]] == [960 * (i + 1) for i in range(len(audio_pages))], "48 kHz granules"

    reader = sphn.OpusStreamReader(24000)
    decoded = [reader.append_bytes(header_bytes)]
    decoded += [reader.append_bytes(p) for p in audio_pages]  # real time: one page per message
    pcm = np.concatenate([d for d in decoded if d is not None and len(d)])
    assert abs(len(pcm) - 24000) <= 2 * 480
    assert abs(dominant_frequency(pcm[2400:], 24000) - 440.0) < 5.0
    assert 0.2 < np.sqrt(np.mean(pcm[2400:] ** 2)) < 0.5


DECODE_BYTES = """async ({ chunks }) => {
  const { OggOpusDecoder } = await import('/js/opus.js');
  const out = [];
  let rate = 0;
  const decoder = new OggOpusDecoder((s, r) => { out.push(...s); rate = r; }, (e) => { throw e; });
  let duration48k = 0;
  for (const chunk of chunks) duration48k += decoder.push(new Uint8Array(chunk));
  await decoder.decoder.flush();
  decoder.close();
  return { samples: out, rate, duration48k, crcErrors: decoder.reader.crcErrors, packets: decoder.packetsIn };
}"""


def _sphn_stream(frequency: float, seconds: float) -> bytes:
    writer = sphn.OpusStreamWriter(24000)
    t = np.arange(int(seconds * 24000)) / 24000
    tone = (0.4 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    return b"".join(writer.append_pcm(tone[i:i + 1920]) for i in range(0, len(tone), 1920))


def test_ogg_opus_decoder_reads_sphn_stream_in_any_split(page):
    stream = _sphn_stream(1000.0, 1.6)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(stream)), size=40, replace=False))
    chunks = [c.tolist() for c in np.split(np.frombuffer(stream, np.uint8), cuts)]
    result = page.evaluate(DECODE_BYTES, {"chunks": chunks})
    pcm = np.asarray(result["samples"], dtype=np.float32)
    rate = result["rate"]
    assert result["crcErrors"] == 0
    assert result["duration48k"] == 2 * 1920 * 20, "packet durations from the TOC bytes: 1.6 s at 48 kHz"
    pre_skip = int.from_bytes(split_ogg_pages(stream)[0]["packets"][0][10:12], "little")  # OpusHead, 48 kHz
    assert abs(len(pcm) / rate - (1.6 - pre_skip / 48000)) < 0.01, "the stream's pre-skip is honoured"
    assert abs(dominant_frequency(pcm[rate // 10:], rate) - 1000.0) < 10.0


def test_ogg_reader_drops_pages_with_a_bad_crc(page):
    stream = bytearray(_sphn_stream(1000.0, 0.4))
    pages = split_ogg_pages(bytes(stream))
    # corrupt one byte in the body of the last page
    stream[-3] ^= 0xFF
    result = page.evaluate(DECODE_BYTES, {"chunks": [list(stream)]})
    assert result["crcErrors"] == 1
    audio_packets = sum(len(p["packets"]) for p in pages[2:])
    assert result["packets"] == audio_packets - 1


RESAMPLE = """async ({ inRate, outRate, frequency, seconds, pull }) => {
  const { StreamResampler } = await import('/js/worklets/resampler.js');
  const r = new StreamResampler(inRate, outRate, 1024, 1024);
  const n = Math.round(seconds * inRate);
  const input = new Float32Array(n);
  for (let i = 0; i < n; i++) input[i] = 0.5 * Math.sin(2 * Math.PI * frequency * i / inRate);
  const out = [];
  if (!pull) {
    for (let s = 0; s < n; s += 128) out.push(...r.process(input.subarray(s, s + 128)));
  } else {
    let read = 0;
    const block = new Float32Array(128);
    while (out.length < seconds * outRate - 256) {
      r.render(block, (dest) => { dest.set(input.subarray(read, read + dest.length)); read += dest.length; });
      out.push(...block);
    }
  }
  return { out, delay: r.halfWidth };
}"""


@pytest.mark.parametrize(
    "in_rate,out_rate,pull",
    [(48000, 24000, False), (44100, 24000, False), (24000, 48000, True), (24000, 44100, True)],
)
def test_resampler_keeps_a_tone_clean(page, in_rate, out_rate, pull):
    frequency = 1000.0
    result = page.evaluate(RESAMPLE, {"inRate": in_rate, "outRate": out_rate, "frequency": frequency,
                                      "seconds": 0.5, "pull": pull})
    out = np.asarray(result["out"])
    assert abs(len(out) - 0.5 * out_rate) < 300
    steady = out[out_rate // 20: -out_rate // 20]
    t = (np.arange(len(out)) / out_rate)[out_rate // 20: -out_rate // 20]
    # least-squares fit of a sine at the tone's frequency: what is left is distortion + aliasing
    basis = np.stack([np.sin(2 * np.pi * frequency * t), np.cos(2 * np.pi * frequency * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, steady, rcond=None)
    residual = steady - basis @ coef
    snr_db = 10 * np.log10(np.mean((basis @ coef) ** 2) / np.mean(residual ** 2))
    assert abs(np.hypot(*coef) - 0.5) < 0.01, "unity gain"
    assert snr_db > 50, f"SNR {snr_db:.1f} dB"


JITTER = """async () => {
  const { JitterBuffer } = await import('/js/worklets/jitter.js');
  const jb = new JitterBuffer({ sampleRate: 24000, startMs: 100, growMs: 40, maxMs: 200, overflowMs: 300 });
  const out = new Float32Array(240);  // 10 ms
  const log = {};
  jb.push(new Float32Array(1920).fill(0.5));            // 80 ms < 100 ms target
  log.beforeStart = [jb.pull(out), jb.playing, out[0]];
  jb.push(new Float32Array(960).fill(0.5));             // 120 ms buffered -> playing
  log.started = jb.playing;
  let real = 0;
  for (let i = 0; i < 13; i++) real += jb.pull(out);   // 130 ms asked, 120 ms there
  log.afterDrain = { real, underruns: jb.underruns, targetMs: jb.targetMs, playing: jb.playing };
  jb.push(new Float32Array(24000).fill(0.1));           // 1 s burst: capped at target + overflow
  log.afterBurst = { bufferedMs: jb.bufferedMs, dropped: jb.droppedSamples };
  for (let k = 0; k < 5; k++) { jb.push(new Float32Array(jb.targetSamples)); while (jb.pull(out) === 240) {} }
  log.capped = jb.targetMs;
  return log;
}"""


def test_jitter_buffer_waits_counts_underruns_and_adapts(page):
    log = page.evaluate(JITTER)
    assert log["beforeStart"] == [0, False, 0], "silence until the target is buffered"
    assert log["started"] is True
    assert log["afterDrain"] == {"real": 2880, "underruns": 1, "targetMs": 140, "playing": False}
    assert log["afterBurst"]["bufferedMs"] == pytest.approx(140)
    assert log["afterBurst"]["dropped"] > 0
    assert log["capped"] == 200, "target grows by 40 ms per underrun up to maxMs"


PROTOCOL = """async () => {
  const p = await import('/js/protocol.js');
  const r = {};
  const hs = new Uint8Array([0, 0, 0, 0, 0, 7, 0, 0, 0]);
  r.handshake = p.decodeMessage(hs.buffer);
  r.text = p.decodeMessage(new Uint8Array([2, 0x20, 0x68, 0xc3, 0xa9]).buffer);
  r.meta = p.decodeMessage(new TextEncoder().encode('\\u0004{"queue_position": 2}').buffer);
  r.query = p.samplingQuery({ text_temperature: '0.5', text_topk: '', audio_seed: '42' }).toString();
  r.url = p.chatUrl({ protocol: 'https:', host: 'example.org:8998' }, new URLSearchParams('a=1'));
  r.errors = [];
  for (const bad of [{ text_topk: '2.5' }, { audio_temperature: 'hot' }, { text_temperature: '-1' }]) {
    try { p.samplingQuery(bad); r.errors.push(null); } catch (e) { r.errors.push(e.message); }
  }
  r.audio = Array.from(p.encodeMessage(p.Kind.AUDIO, new Uint8Array([9, 8])));
  return r;
}"""


def test_protocol_helpers(page):
    r = page.evaluate(PROTOCOL)
    assert r["handshake"] == {"kind": 0, "protocolVersion": 0, "modelVersion": 7}
    assert r["text"] == {"kind": 2, "text": " hé"}
    assert r["meta"] == {"kind": 4, "data": {"queue_position": 2}}
    assert r["query"] == "text_temperature=0.5&audio_seed=42"
    assert r["url"] == "wss://example.org:8998/api/chat?a=1"
    assert r["errors"][0] == "Text top-k must be a whole number"
    assert r["errors"][1] == "Audio temperature must be a number"
    assert r["errors"][2] == "Text temperature must be between 0 and 5"
    assert r["audio"] == [1, 9, 8]


def _ogg_page(body_segments: list[int], body: bytes, flags: int, sequence: int, granule: int = 0) -> bytes:
    """One Ogg page built in Python (independent of the page's writer), CRC included."""
    from web_support import ogg_crc32

    header = bytearray(b"OggS" + bytes([0, flags]) + granule.to_bytes(8, "little", signed=True)
                       + (7).to_bytes(4, "little") + sequence.to_bytes(4, "little") + b"\0\0\0\0"
                       + bytes([len(body_segments)]) + bytes(body_segments))
    page = header + body
    page[22:26] = ogg_crc32(bytes(page)).to_bytes(4, "little")
    return bytes(page)


READ_PACKETS = """async ({ chunks }) => {
  const { OggPageReader } = await import('/js/ogg.js');
  const reader = new OggPageReader();
  const packets = [];
  for (const chunk of chunks) for (const p of reader.push(new Uint8Array(chunk))) packets.push(Array.from(p.packet));
  return { packets, skipped: reader.skippedBytes, crcErrors: reader.crcErrors };
}"""


def test_ogg_reader_joins_packets_that_span_pages_and_resyncs_after_garbage(page):
    big = bytes(range(256)) * 2 + bytes(88)  # 600 bytes: lacing 255, 255, 90 split over two pages
    small = b"\x01\x02\x03"
    first = _ogg_page([3, 255, 255], small + big[:510], flags=0, sequence=0)
    second = _ogg_page([90], big[510:], flags=0x01, sequence=1, granule=960)
    garbage = b"not an ogg page"
    stream = garbage + first + second
    result = page.evaluate(READ_PACKETS, {"chunks": [list(stream[:40]), list(stream[40:])]})
    assert [bytes(p) for p in result["packets"]] == [small, big]
    assert result["skipped"] == len(garbage) and result["crcErrors"] == 0
