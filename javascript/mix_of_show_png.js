/*
 * Mix-of-Show region canvas: the mask codec. Painted regions are stored in the spec's `mask_image`,
 * a colour-coded PNG: one exact colour per painted region, black elsewhere.
 *
 * - writing: `encodeIndexedPNG` makes an 8-bit palette PNG of a label map (exact colours, a few
 *   hundred bytes in the infotext);
 * - reading: `loadImage` / `pixelsOf` decode a `mask_image` (`maskURL`), an uploaded mask or a
 *   reference image into RGBA pixels; `maskColors` lists an uploaded mask's colours (antialiasing
 *   left out) and `labelsOf` turns pixels into a label map (one region id per pixel).
 *
 * Exposed as `window.MixOfShow.png`; uses `MixOfShow.util` (javascript/mix_of_show.js).
 */
(function() {
    "use strict";

    const MOS = window.MixOfShow = window.MixOfShow || {};
    const {el} = MOS.util;

    const MIN_COLOR_SHARE = 0.001; // uploaded-mask colours below this share of pixels are antialiasing

    // ------------------------------------------- indexed PNG: exact colours, a few hundred bytes

    const CRC_TABLE = (() => {
        const table = new Uint32Array(256);
        for (let n = 0; n < 256; n++) {
            let c = n;
            for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
            table[n] = c >>> 0;
        }
        return table;
    })();

    function pngChunk(type, data) {
        const out = new Uint8Array(12 + data.length);
        const view = new DataView(out.buffer);
        view.setUint32(0, data.length);
        for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
        out.set(data, 8);
        let c = 0xffffffff;
        for (let i = 4; i < 8 + data.length; i++) c = CRC_TABLE[(c ^ out[i]) & 255] ^ (c >>> 8);
        view.setUint32(8 + data.length, (c ^ 0xffffffff) >>> 0);
        return out;
    }

    /** 8-bit palette PNG of `indices` (W*H) with `palette` (0xRRGGBB per index), as a data URL.
     * A canvas' toDataURL writes RGBA and compresses a mask ten times worse; this stays small
     * in the infotext. Compression is the browser's own zlib (CompressionStream). */
    async function encodeIndexedPNG(indices, W, H, palette) {
        const raw = new Uint8Array((W + 1) * H); // filter byte 0 (None) before every row
        for (let y = 0; y < H; y++) raw.set(indices.subarray(y * W, (y + 1) * W), y * (W + 1) + 1);
        const idat = new Uint8Array(await new Response(new Blob([raw]).stream()
            .pipeThrough(new CompressionStream("deflate"))).arrayBuffer());
        const header = new Uint8Array(13);
        const view = new DataView(header.buffer);
        view.setUint32(0, W);
        view.setUint32(4, H);
        header.set([8, 3, 0, 0, 0], 8); // bit depth 8, palette colour, deflate, no filter, no interlace
        const plte = new Uint8Array(3 * palette.length);
        palette.forEach((v, i) => plte.set([v >> 16, (v >> 8) & 255, v & 255], 3 * i));
        const parts = [new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), pngChunk("IHDR", header),
            pngChunk("PLTE", plte), pngChunk("IDAT", idat), pngChunk("IEND", new Uint8Array(0))];
        const bytes = new Uint8Array(parts.reduce((n, part) => n + part.length, 0));
        let offset = 0;
        for (const part of parts) {
            bytes.set(part, offset);
            offset += part.length;
        }
        let binary = "";
        for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
        return "data:image/png;base64," + btoa(binary);
    }

    // ------------------------------------------------------------------- reading images and masks

    function maskURL(text) {
        const t = text.trim();
        return t.startsWith("data:") ? t : "data:image/png;base64," + t.replace(/\s+/g, "");
    }

    function loadImage(src) {
        return new Promise((resolve, reject) => {
            const img = new Image();
            img.onload = () => resolve(img);
            img.onerror = () => reject(new Error("the image could not be read"));
            img.src = src;
        });
    }

    function pixelsOf(img, width, height) {
        const c = el("canvas", {width, height});
        const ctx = c.getContext("2d", {willReadFrequently: true});
        ctx.imageSmoothingEnabled = false;
        ctx.drawImage(img, 0, 0, width, height);
        return ctx.getImageData(0, 0, width, height).data;
    }

    /** The colours of an uploaded mask's RGBA `data` (W x H), most pixels first, as [0xRRGGBB, count]:
     * black, transparent pixels and colours below MIN_COLOR_SHARE (antialiasing) left out. */
    function maskColors(data, W, H) {
        const counts = new Map();
        for (let i = 0; i < W * H; i++) {
            if (data[4 * i + 3] < 128) continue;
            const v = (data[4 * i] << 16) | (data[4 * i + 1] << 8) | data[4 * i + 2];
            if (v) counts.set(v, (counts.get(v) || 0) + 1);
        }
        return [...counts.entries()].filter(([, n]) => n >= MIN_COLOR_SHARE * W * H).sort((a, b) => b[1] - a[1]);
    }

    /** The label map (W x H region ids) of RGBA `data`: `idOf` maps 0xRRGGBB to a region id; other
     * colours and transparent pixels are 0. */
    function labelsOf(data, W, H, idOf) {
        const labels = new Uint8Array(W * H);
        for (let i = 0; i < W * H; i++) {
            if (data[4 * i + 3] < 128) continue;
            const id = idOf.get((data[4 * i] << 16) | (data[4 * i + 1] << 8) | data[4 * i + 2]);
            if (id !== undefined) labels[i] = id;
        }
        return labels;
    }

    MOS.png = {encodeIndexedPNG, maskURL, loadImage, pixelsOf, maskColors, labelsOf};
})();
