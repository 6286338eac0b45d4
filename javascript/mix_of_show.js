/*
 * Mix-of-Show region canvas for the txt2img script "Mix-of-Show".
 *
 * The script's "Regions (JSON)" textbox stays the one source of truth (infotext, API and "Send to
 * txt2img" all go through it): every edit on the canvas rewrites that JSON, and any change to the
 * JSON that the canvas did not write itself (typing, pasting infotext, the API's UI state) is parsed
 * and redrawn. The JSON form is lib_mos/regions.py's: boxes are [top, left, bottom, right] in "px"
 * or "fraction" units; painted regions name a colour of a colour-coded PNG `mask_image`.
 *
 * Boxes drawn here are written in fraction units snapped to the 8 px latent grid, so they follow the
 * size sliders; painted regions live in a label map (one region id per pixel, no antialiasing) that
 * is encoded with exact colours. The host's page contract used: gradioApp, onUiLoaded,
 * onAfterUiUpdate, updateInput, and the sliders #<tab>_width / #<tab>_height.
 *
 * Each region may list LoRAs applied inside it only ("loras": [{"name", "weight"}]) and its own share
 * of the main prompt ("global_weight", else the spec's "global_weight", default 0). The LoRA picker is
 * javascript/mix_of_show_loras.js (window.MixOfShowLoras); like typed prompts, these fields are text
 * edits: no undo entry, and undoing a shape keeps them.
 */
(function() {
    "use strict";

    const MAX_REGIONS = 16;
    const GRID = 8; // output pixels per latent cell
    const MAX_UNDO = 50;
    const MIN_COLOR_SHARE = 0.001; // uploaded-mask colours below this share of pixels are antialiasing
    const PALETTE = [
        "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
        "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#ffd8b1",
    ];
    const HANDLES = ["nw", "n", "ne", "e", "se", "s", "sw", "w"];
    const TEXT_FIELDS = ["prompt", "negative", "loras", "globalWeight"]; // typed, not drawn: outside undo
    const GLOBAL_HINT = "0 = inside a region only its prompt counts (the main prompt applies outside the regions); "
        + "0.3 keeps 30 % of the main prompt there. A region's own value overrides it.";
    // the host's extra-network tag, as lib_mos.regions reads it: <kind:arg:arg...>
    const EXTRA_NETWORK_TAG = /<(\w+):([^>]+)>/g;
    const instances = new Map();

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function el(tag, props, children) {
        const node = document.createElement(tag);
        for (const [key, value] of Object.entries(props || {})) {
            if (key === "class") node.className = value;
            else if (key === "text") node.textContent = value;
            else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
            else if (key in node && typeof value !== "string") node[key] = value;
            else node.setAttribute(key, value);
        }
        for (const child of children || []) node.append(child);
        return node;
    }

    function hexToInt(color) {
        return parseInt(color.slice(1), 16);
    }

    function rgba(color, alpha) {
        const v = hexToInt(color);
        return `rgba(${v >> 16},${(v >> 8) & 255},${v & 255},${alpha})`;
    }

    /** Names of the `<lora:name:w>` (or `<lyco:...>`) tags in a region prompt. */
    function promptLoraNames(prompt) {
        const names = [];
        for (const m of (prompt || "").matchAll(EXTRA_NETWORK_TAG)) {
            if (m[1] === "lora" || m[1] === "lyco") names.push(m[2].split(":")[0].trim());
        }
        return names;
    }

    /** A number in [0, 1] read from a number input: null when empty, NaN when it is no such number. */
    function readShare(input) {
        if (input.validity.badInput) return NaN;
        if (input.value.trim() === "") return null;
        const v = Number(input.value);
        return Number.isFinite(v) && v >= 0 && v <= 1 ? v : NaN;
    }

    /** What a share input stands for once left: empty is `empty`, out of [0, 1] is clamped, no number
     * at all is `current` (the JSON's). */
    function settledShare(input, current, empty) {
        if (input.validity.badInput) return current;
        if (input.value.trim() === "") return empty;
        const v = Number(input.value);
        return Number.isFinite(v) ? Math.min(Math.max(v, 0), 1) : current;
    }

    function copyRegion(r) {
        return {...r, box: r.box && r.box.slice(), loras: r.loras.map(l => ({...l}))};
    }

    function fireInput(target) {
        if (typeof updateInput === "function") {
            updateInput(target);
        } else {
            target.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    // ------------------------------------------------------------------ the JSON form (regions.py)

    function splitTopLevel(text, sep) {
        const parts = [];
        let depth = 0;
        let start = 0;
        for (let i = 0; i < text.length;) {
            const ch = text[i];
            if (ch === "[") depth++;
            else if (ch === "]") depth = Math.max(depth - 1, 0);
            else if (depth === 0 && text.startsWith(sep, i)) {
                parts.push(text.slice(start, i));
                i += sep.length;
                start = i;
                continue;
            }
            i++;
        }
        parts.push(text.slice(start));
        return parts;
    }

    /** The authors' `[prompt]-*-[negative]-*-[top, left, bottom, right]|...` form. */
    function parseAuthors(text) {
        const segments = splitTopLevel(text, "|");
        if (segments.length && !segments[segments.length - 1].trim()) segments.pop();
        const regions = segments.map((segment, i) => {
            const parts = splitTopLevel(segment, "-*-").map(s => s.trim());
            const inner = s => (s.startsWith("[") && s.endsWith("]") ? s.slice(1, -1).trim() : null);
            if (parts.length !== 3 || inner(parts[0]) === null || inner(parts[1]) === null) {
                throw new Error(`region ${i}: expected [prompt]-*-[negative]-*-[top, left, bottom, right]`);
            }
            const box = JSON.parse(parts[2]);
            if (!Array.isArray(box)) throw new Error(`region ${i}: field 'box' must be [top, left, bottom, right] or []`);
            return {prompt: inner(parts[0]), negative: inner(parts[1]), box: box.length ? box : [0, 0, 1, 1],
                units: box.length ? "px" : "fraction"};
        });
        return {regions, feather: 0, mask_image: null, global_weight: 0};
    }

    /** A region's `loras`, each item kept as written (weight and all), so a rewrite changes nothing. */
    function parseLoras(value, i) {
        if (value === undefined || value === null) return [];
        if (!Array.isArray(value)) throw new Error(`region ${i}: field 'loras' must be a list of {"name": ..., "weight": ...}`);
        return value.map((item, j) => {
            if (item === null || typeof item !== "object" || Array.isArray(item) || typeof item.name !== "string" || !item.name.trim()) {
                throw new Error(`region ${i}: field 'loras[${j}]' must be an object with a LoRA's "name"`);
            }
            if (item.weight !== undefined && !Number.isFinite(item.weight)) {
                throw new Error(`region ${i}: field 'loras[${j}]': the weight of LoRA ${item.name} must be a number`);
            }
            return {...item};
        });
    }

    function parseGlobalWeight(value, where) {
        if (value === undefined || value === null) return null;
        if (!Number.isFinite(value)) throw new Error(`${where}field 'global_weight' must be a number in [0, 1]`);
        return value;
    }

    /** Lenient reader: anything it can show is shown; lib_mos is the judge at generation time. */
    function parseSpec(text) {
        const trimmed = (text || "").trim();
        if (!trimmed) return {regions: [], feather: 0, mask_image: null, global_weight: 0};
        const data = trimmed.startsWith("{") ? JSON.parse(trimmed) : parseAuthors(trimmed);
        if (data === null || typeof data !== "object" || Array.isArray(data)) {
            throw new Error("a region spec must be a JSON object");
        }
        if (!Array.isArray(data.regions)) throw new Error("field 'regions' must be a list");
        if (data.regions.length > MAX_REGIONS) {
            throw new Error(`field 'regions': ${data.regions.length} regions, at most ${MAX_REGIONS} are supported`);
        }
        const regions = data.regions.map((r, i) => {
            if (r === null || typeof r !== "object" || Array.isArray(r)) throw new Error(`region ${i}: must be an object`);
            const region = {
                prompt: typeof r.prompt === "string" ? r.prompt : "",
                negative: typeof r.negative === "string" ? r.negative : "",
                kind: "none", box: null, units: r.units === "fraction" ? "fraction" : "px", color: null,
                loras: parseLoras(r.loras, i), globalWeight: parseGlobalWeight(r.global_weight, `region ${i}: `),
            };
            if (r.box !== undefined && r.box !== null) {
                if (!Array.isArray(r.box) || r.box.length !== 4 || !r.box.every(Number.isFinite)) {
                    throw new Error(`region ${i}: field 'box' must be 4 numbers [top, left, bottom, right]`);
                }
                region.kind = "box";
                region.box = r.box.slice();
            }
            if (r.color !== undefined && r.color !== null) {
                if (typeof r.color !== "string" || !/^#[0-9a-fA-F]{6}$/.test(r.color)) {
                    throw new Error(`region ${i}: field 'color' must be '#rrggbb'`);
                }
                if (region.kind === "box") throw new Error(`region ${i}: a region needs exactly one of 'box' and 'color'`);
                region.kind = "paint";
                region.color = r.color.toLowerCase();
            }
            return region;
        });
        const feather = Number.isFinite(data.feather) ? data.feather : 0;
        const mask = typeof data.mask_image === "string" ? data.mask_image : null;
        const globalWeight = parseGlobalWeight(data.global_weight, "") || 0;
        return {regions, feather, mask_image: mask, global_weight: globalWeight};
    }

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

    // ----------------------------------------------------------------------------- the editor

    class RegionCanvas {
        constructor(root) {
            this.root = root;
            this.regionsId = root.dataset.regions;
            this.tab = root.dataset.tab || "txt2img";
            this.regions = []; // {id, prompt, negative, kind: box|paint|none, box, units, color, loras, globalWeight}
            this.feather = 0;
            this.globalWeight = 0; // the spec's share of the main prompt inside regions
            this.labels = null; // Uint8Array of region ids, labelW x labelH; shared with undo snapshots
            this.labelW = 0;
            this.labelH = 0;
            this.labelsShared = false;
            this.mask = null; // the mask_image text for the current labels (null: encode on write)
            this.maskVersion = 0; // bumped whenever `mask` stops describing the labels
            this.writeSeq = 0;
            this.selected = -1;
            this.tool = "box";
            this.brush = 24;
            this.undoStack = [];
            this.redoStack = [];
            this.gesture = null;
            this.reference = null;
            this.size = [512, 512];
            this.seen = null; // last textbox value looked at
            this.written = null; // last textbox value written by the canvas
            this.loadSeq = 0;
            this.build();
            this.poll();
            this.timer = setInterval(() => this.poll(), 250);
        }

        // ---- host page

        textarea() {
            return app().querySelector(`#${this.regionsId} textarea`);
        }

        readSize() {
            const read = name => {
                const input = app().querySelector(`#${this.tab}_${name} input[type=number]`);
                const v = input ? Math.round(Number(input.value)) : NaN;
                return Number.isFinite(v) && v >= GRID ? v : null;
            };
            return [read("width") || this.size[0], read("height") || this.size[1]];
        }

        /** Follows the sliders and the JSON, whoever changed them (typing, paste, the backend). */
        poll() {
            if (!this.root.isConnected) {
                clearInterval(this.timer);
                if (instances.get(this.regionsId) === this) instances.delete(this.regionsId);
                return;
            }
            const size = this.readSize();
            if (size[0] !== this.size[0] || size[1] !== this.size[1]) {
                this.size = size;
                this.sizeLabel.textContent = `${size[0]}×${size[1]}`;
                this.layout();
                this.renderList();
            }
            const ta = this.textarea();
            if (ta && ta.value !== this.seen) {
                this.seen = ta.value;
                if (ta.value !== this.written) this.load(ta.value);
            }
        }

        /** Rewrites the JSON; async only while a changed mask is encoded (the newest write wins). */
        async write() {
            const seq = ++this.writeSeq;
            if (this.mask === null && this.regions.some(r => r.kind === "paint")) {
                const version = this.maskVersion;
                const mask = await this.encodeMask();
                if (version === this.maskVersion) this.mask = mask;
                if (seq !== this.writeSeq || this.mask === null) return;
            }
            const text = this.toJSON();
            this.written = text;
            this.seen = text;
            const ta = this.textarea();
            if (ta && ta.value !== text) {
                ta.value = text;
                fireInput(ta);
            }
        }

        toJSON() {
            if (!this.regions.length) return "";
            const out = {regions: this.regions.map(r => {
                const o = {prompt: r.prompt};
                if (r.negative) o.negative = r.negative;
                if (r.kind === "box") {
                    o.box = r.box.slice();
                    if (r.units === "fraction") o.units = "fraction";
                }
                if (r.kind === "paint") o.color = r.color;
                if (r.loras.length) o.loras = r.loras.map(l => ({...l}));
                if (r.globalWeight !== null) o.global_weight = r.globalWeight;
                return o;
            })};
            if (this.regions.some(r => r.kind === "paint")) out.mask_image = this.mask;
            if (this.feather > 0) out.feather = this.feather;
            if (this.globalWeight) out.global_weight = this.globalWeight;
            return JSON.stringify(out);
        }

        /** The label map with each painted region's colour, black elsewhere. */
        encodeMask() {
            const painted = this.regions.filter(r => r.kind === "paint");
            const index = new Uint8Array(256);
            painted.forEach((r, i) => { index[r.id] = i + 1; });
            const W = this.labelW || this.size[0], H = this.labelH || this.size[1];
            const indices = new Uint8Array(W * H);
            if (this.labels) for (let i = 0; i < indices.length; i++) indices[i] = index[this.labels[i]];
            return encodeIndexedPNG(indices, W, H, [0, ...painted.map(r => hexToInt(r.color))]);
        }

        invalidateMask(text) {
            this.mask = text === undefined ? null : text;
            this.maskVersion++;
        }

        /** Every region in its colour at the current size, boxes over paint: the downloadable mask. */
        rasterize() {
            const [W, H] = this.size;
            const c = el("canvas", {width: W, height: H});
            const ctx = c.getContext("2d");
            const img = ctx.createImageData(W, H);
            const colorOf = new Map(this.regions.map(r => [r.id, hexToInt(r.color)]));
            const labels = this.resampledLabels(W, H);
            const d = img.data;
            for (let i = 0; i < W * H; i++) {
                const v = labels ? colorOf.get(labels[i]) : undefined;
                if (v !== undefined) {
                    d[4 * i] = v >> 16;
                    d[4 * i + 1] = (v >> 8) & 255;
                    d[4 * i + 2] = v & 255;
                }
                d[4 * i + 3] = 255;
            }
            ctx.putImageData(img, 0, 0);
            for (const r of this.regions) {
                if (r.kind !== "box") continue;
                const [t, l, b, rt] = this.boxPx(r).map(Math.round);
                ctx.fillStyle = r.color;
                ctx.fillRect(l, t, rt - l, b - t);
            }
            return c;
        }

        load(text) {
            const first = this.written === null && !this.undoStack.length && !this.regions.length;
            let spec;
            try {
                spec = parseSpec(text);
            } catch (e) {
                this.status(`Regions JSON not shown: ${e.message}`, true);
                return;
            }
            if (!first) this.pushUndo(); // pasting over a drawing can be undone
            const count = this.regions.length;
            const seq = ++this.loadSeq;
            this.regions = spec.regions.map((r, i) => ({...r, id: i + 1}));
            this.assignColors();
            this.feather = spec.feather;
            this.featherInput.value = String(this.feather);
            this.setGlobalWeight(spec.global_weight);
            this.labels = null;
            this.labelW = this.labelH = 0;
            this.invalidateMask(spec.mask_image); // kept as written until the paint changes
            if (this.regions.length !== count) this.selected = -1; // a hand edit keeps it, a paste clears it
            this.afterChange(false);
            this.status(`${this.regions.length} region(s) read from the JSON`);
            if (spec.mask_image && this.regions.some(r => r.kind === "paint")) {
                loadImage(maskURL(spec.mask_image)).then(img => {
                    if (seq !== this.loadSeq) return;
                    this.setLabelsFrom(pixelsOf(img, img.naturalWidth, img.naturalHeight),
                        img.naturalWidth, img.naturalHeight, new Map(this.regions.filter(r => r.kind === "paint")
                            .map(r => [hexToInt(r.color), r.id])));
                    this.afterChange(false);
                }).catch(e => {
                    if (seq === this.loadSeq) this.status(`mask_image not shown: ${e.message}`, true);
                });
            }
        }

        setLabelsFrom(data, W, H, idOf) {
            const labels = new Uint8Array(W * H);
            for (let i = 0; i < W * H; i++) {
                if (data[4 * i + 3] < 128) continue;
                const id = idOf.get((data[4 * i] << 16) | (data[4 * i + 1] << 8) | data[4 * i + 2]);
                if (id !== undefined) labels[i] = id;
            }
            this.labels = labels;
            this.labelW = W;
            this.labelH = H;
            this.labelsShared = false;
        }

        /** Painted colours are the user's; the others get distinct palette colours (display only). */
        assignColors() {
            const used = new Set(this.regions.filter(r => r.kind === "paint").map(r => r.color));
            this.regions.forEach((r, i) => {
                if (r.kind === "paint" && r.color) return;
                let color = PALETTE[i % PALETTE.length];
                if (used.has(color)) color = PALETTE.find(c => !used.has(c)) || color;
                r.color = color;
                used.add(color);
            });
        }

        freeColor() {
            const used = new Set(this.regions.map(r => r.color));
            return PALETTE.find(c => !used.has(c)) || PALETTE[this.regions.length % PALETTE.length];
        }

        freeId() {
            const used = new Set(this.regions.map(r => r.id));
            for (let id = 1; id < 256; id++) if (!used.has(id)) return id;
            return 255;
        }

        // ---- editing

        snapshot() {
            if (this.labels) this.labelsShared = true;
            return {
                regions: this.regions.map(copyRegion),
                labels: this.labels, labelW: this.labelW, labelH: this.labelH, mask: this.mask,
                feather: this.feather, selected: this.selected,
            };
        }

        restore(s) {
            const current = new Map(this.regions.map(r => [r.id, r]));
            this.regions = s.regions.map(copyRegion);
            for (const r of this.regions) { // undo is for shapes: prompts, LoRAs, weights typed since then stay
                const now = current.get(r.id);
                if (!now) continue;
                const typed = copyRegion(now);
                for (const field of TEXT_FIELDS) r[field] = typed[field];
            }
            this.labels = s.labels;
            this.labelW = s.labelW;
            this.labelH = s.labelH;
            this.labelsShared = !!s.labels;
            this.invalidateMask(s.mask);
            this.feather = s.feather;
            this.featherInput.value = String(this.feather);
            this.selected = Math.min(s.selected, this.regions.length - 1);
            this.loadSeq++;
        }

        pushUndo(snap) {
            this.undoStack.push(snap || this.snapshot());
            if (this.undoStack.length > MAX_UNDO) this.undoStack.shift();
            this.redoStack.length = 0;
        }

        undo() {
            this.travel(this.undoStack, this.redoStack, "Undone", "Nothing to undo");
        }

        redo() {
            this.travel(this.redoStack, this.undoStack, "Redone", "Nothing to redo");
        }

        /** Restore the newest state of `from`, keeping the current one on `to`. */
        travel(from, to, done, none) {
            if (!from.length) return this.status(none);
            to.push(this.snapshot());
            this.restore(from.pop());
            this.afterChange(true);
            this.status(done);
        }

        /** Redraw everything; `persist` writes the JSON (false when the JSON is where it came from). */
        afterChange(persist) {
            this.rebuildOverlay();
            this.renderList();
            this.render();
            if (persist) this.write();
        }

        addRegion(kind) {
            if (this.regions.length >= MAX_REGIONS) {
                this.status(`At most ${MAX_REGIONS} regions`, true);
                return null;
            }
            const region = {id: this.freeId(), prompt: "", negative: "", kind: kind || "none", box: null,
                units: "fraction", color: this.freeColor(), loras: [], globalWeight: null};
            this.regions.push(region);
            this.selected = this.regions.length - 1;
            return region;
        }

        deleteRegion(index) {
            if (index < 0 || index >= this.regions.length) return;
            this.pushUndo();
            const [gone] = this.regions.splice(index, 1);
            if (gone.kind === "paint" && this.labels) {
                this.ownLabels();
                for (let i = 0; i < this.labels.length; i++) if (this.labels[i] === gone.id) this.labels[i] = 0;
                this.invalidateMask();
            }
            this.selected = Math.min(index, this.regions.length - 1);
            this.afterChange(true);
            this.status(`Region ${index + 1} deleted (Ctrl+Z brings it back)`);
        }

        select(index) {
            this.selected = index;
            this.rebuildOverlay();
            this.renderList();
            this.render();
        }

        /** The label map at W x H (nearest, pixel centres: lib_mos.regions' rule); null without paint. */
        resampledLabels(W, H) {
            if (!this.labels || (this.labelW === W && this.labelH === H)) return this.labels;
            const out = new Uint8Array(W * H);
            for (let y = 0; y < H; y++) {
                const row = Math.floor(((2 * y + 1) * this.labelH) / (2 * H)) * this.labelW;
                for (let x = 0; x < W; x++) out[y * W + x] = this.labels[row + Math.floor(((2 * x + 1) * this.labelW) / (2 * W))];
            }
            return out;
        }

        ownLabels() {
            const [W, H] = this.size;
            if (!this.labels) {
                this.loadSeq++; // a mask still decoding would overwrite this paint
                this.labels = new Uint8Array(W * H);
                this.labelW = W;
                this.labelH = H;
            } else if (this.labelW !== W || this.labelH !== H) { // paint at the current size
                this.labels = this.resampledLabels(W, H);
                this.labelW = W;
                this.labelH = H;
            } else if (this.labelsShared) {
                this.labels = this.labels.slice();
            }
            this.labelsShared = false;
        }

        // ---- geometry (image pixels at the current size)

        boxPx(r) {
            const [W, H] = this.size;
            const [t, l, b, rt] = r.box;
            return r.units === "fraction" ? [t * H, l * W, b * H, rt * W] : [t, l, b, rt];
        }

        setBoxPx(r, box) {
            const [W, H] = this.size;
            r.box = r.units === "fraction" ? [box[0] / H, box[1] / W, box[2] / H, box[3] / W] : box.slice();
        }

        boxProblem(r) {
            const [W, H] = this.size;
            const [t, l, b, rt] = this.boxPx(r);
            if (t < 0 || l < 0 || b > H + 1e-6 || rt > W + 1e-6) return `box lies outside the ${W}×${H} image`;
            if (b - t < GRID || rt - l < GRID) return "box is smaller than one latent cell (8 px)";
            return null;
        }

        toImage(e) {
            const rect = this.canvas.getBoundingClientRect();
            const [W, H] = this.size;
            return [(e.clientX - rect.left) * W / rect.width, (e.clientY - rect.top) * H / rect.height];
        }

        snap(v, max) {
            return Math.min(Math.max(Math.round(v / GRID) * GRID, 0), max);
        }

        handleAt(x, y) {
            const r = this.regions[this.selected];
            if (!r || r.kind !== "box") return null;
            const tol = 8 * this.size[0] / this.canvas.getBoundingClientRect().width;
            const [t, l, b, rt] = this.boxPx(r);
            const points = {nw: [l, t], n: [(l + rt) / 2, t], ne: [rt, t], e: [rt, (t + b) / 2], se: [rt, b],
                s: [(l + rt) / 2, b], sw: [l, b], w: [l, (t + b) / 2]};
            for (const h of HANDLES) {
                if (Math.abs(points[h][0] - x) <= tol && Math.abs(points[h][1] - y) <= tol) return h;
            }
            return null;
        }

        regionAt(x, y) {
            const inside = r => {
                if (r.kind !== "box") return false;
                const [t, l, b, rt] = this.boxPx(r);
                return y >= t && y <= b && x >= l && x <= rt;
            };
            const sel = this.regions[this.selected];
            if (sel && inside(sel)) return this.selected;
            for (let i = this.regions.length - 1; i >= 0; i--) if (inside(this.regions[i])) return i;
            if (this.labels) {
                const lx = Math.floor(x * this.labelW / this.size[0]);
                const ly = Math.floor(y * this.labelH / this.size[1]);
                if (lx >= 0 && ly >= 0 && lx < this.labelW && ly < this.labelH) {
                    const id = this.labels[ly * this.labelW + lx];
                    if (id) return this.regions.findIndex(r => r.id === id);
                }
            }
            return -1;
        }

        // ---- pointer gestures

        onPointerDown(e) {
            if (e.button !== 0) return;
            e.preventDefault();
            this.canvas.focus({preventScroll: true});
            this.canvas.setPointerCapture(e.pointerId);
            const [x, y] = this.toImage(e);
            const g = {x0: x, y0: y, before: this.snapshot(), changed: false, pointer: e.pointerId};
            if (this.tool === "box") {
                const handle = this.handleAt(x, y);
                const hit = handle ? this.selected : this.regionAt(x, y);
                if (handle || (hit >= 0 && this.regions[hit].kind === "box")) {
                    g.mode = handle ? "resize" : "move";
                    g.handle = handle;
                    g.index = hit;
                    g.box = this.boxPx(this.regions[hit]);
                    if (hit !== this.selected) this.select(hit);
                } else {
                    g.mode = "create";
                    g.hit = hit;
                }
            } else {
                let r = this.regions[this.selected];
                if (this.tool === "brush" && (!r || r.kind === "box")) {
                    if (this.regions.length >= MAX_REGIONS) {
                        this.status(`At most ${MAX_REGIONS} regions`, true);
                        return;
                    }
                    r = null;
                }
                if (this.tool === "eraser" && (!r || r.kind !== "paint")) {
                    this.status("Select a painted region to erase", true);
                    return;
                }
                g.mode = "paint";
                g.region = r;
                g.last = [x, y];
            }
            this.gesture = g;
            if (g.mode === "paint") this.stroke(x, y);
        }

        onPointerMove(e) {
            const g = this.gesture;
            const [x, y] = this.toImage(e);
            if (!g) {
                this.canvas.style.cursor = this.tool !== "box" ? "crosshair" : this.cursorAt(x, y);
                return;
            }
            const [W, H] = this.size;
            if (g.mode === "create") {
                const rect = this.canvas.getBoundingClientRect();
                if (Math.hypot(x - g.x0, y - g.y0) * rect.width / W < 4 && !g.draft) return;
                g.draft = [this.snap(Math.min(y, g.y0), H), this.snap(Math.min(x, g.x0), W),
                    this.snap(Math.max(y, g.y0), H), this.snap(Math.max(x, g.x0), W)];
                for (const [lo, hi, max] of [[0, 2, H], [1, 3, W]]) { // at least one latent cell each way
                    if (g.draft[hi] - g.draft[lo] < GRID) {
                        g.draft[hi] = Math.min(g.draft[lo] + GRID, max);
                        g.draft[lo] = g.draft[hi] - GRID;
                    }
                }
                this.render();
            } else if (g.mode === "move") {
                const [t, l, b, rt] = g.box;
                const dy = Math.min(Math.max(Math.round((y - g.y0) / GRID) * GRID, -t), H - b);
                const dx = Math.min(Math.max(Math.round((x - g.x0) / GRID) * GRID, -l), W - rt);
                this.setBoxPx(this.regions[g.index], [t + dy, l + dx, b + dy, rt + dx]);
                g.changed = g.changed || dx !== 0 || dy !== 0;
                this.render();
            } else if (g.mode === "resize") {
                let [t, l, b, rt] = g.box;
                const h = g.handle;
                if (h.includes("n")) t = Math.min(this.snap(t + y - g.y0, H), b - GRID);
                if (h.includes("s")) b = Math.max(this.snap(b + y - g.y0, H), t + GRID);
                if (h.includes("w")) l = Math.min(this.snap(l + x - g.x0, W), rt - GRID);
                if (h.includes("e")) rt = Math.max(this.snap(rt + x - g.x0, W), l + GRID);
                this.setBoxPx(this.regions[g.index], [t, l, b, rt]);
                g.changed = true;
                this.render();
            } else if (g.mode === "paint") {
                for (const ev of e.getCoalescedEvents ? e.getCoalescedEvents() : [e]) {
                    const [px, py] = this.toImage(ev);
                    this.stroke(px, py);
                }
            }
        }

        onPointerUp(e) {
            const g = this.gesture;
            if (!g) return;
            this.gesture = null;
            if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
            if (g.mode === "create") {
                if (!g.draft) { // a click: select what is under it, or nothing
                    this.select(g.hit);
                    return;
                }
                let r = this.regions[this.selected];
                if (!r || r.kind !== "none") r = this.addRegion("box");
                if (!r) return this.render();
                r.kind = "box";
                r.units = "fraction";
                this.setBoxPx(r, g.draft);
                g.changed = true;
            }
            if (g.changed) {
                this.pushUndo(g.before);
                this.afterChange(true);
                this.status(g.mode === "paint" ? `Painted region ${this.selected + 1}` : `Region ${this.selected + 1}: box ${this.describeBox(this.regions[this.selected])}`);
            } else {
                this.render();
            }
        }

        cursorAt(x, y) {
            const h = this.handleAt(x, y);
            if (h) return {n: "ns-resize", s: "ns-resize", e: "ew-resize", w: "ew-resize", nw: "nwse-resize", se: "nwse-resize", ne: "nesw-resize", sw: "nesw-resize"}[h];
            const i = this.regionAt(x, y);
            return i >= 0 && this.regions[i].kind === "box" ? "move" : "crosshair";
        }

        /** Stamp the brush from the last point to (x, y): a hard disc, exact region ids. */
        stroke(x, y) {
            const g = this.gesture;
            if (!g.changed) { // the first stamp of a stroke claims or creates its region
                this.ownLabels();
                if (this.tool === "brush" && !g.region) {
                    g.region = this.addRegion("paint");
                    this.renderList();
                }
                if (this.tool === "brush") g.region.kind = "paint";
                g.changed = true;
                this.invalidateMask();
            }
            const id = g.region.id;
            const erase = this.tool === "eraser";
            const [x0, y0] = g.last;
            const sx = this.labelW / this.size[0];
            const sy = this.labelH / this.size[1];
            const radius = this.brush / 2;
            const steps = Math.max(1, Math.ceil(Math.hypot(x - x0, y - y0) / Math.max(1, radius / 3)));
            let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
            for (let s = 1; s <= steps; s++) {
                const cx = (x0 + (x - x0) * s / steps) * sx;
                const cy = (y0 + (y - y0) * s / steps) * sy;
                const rx = radius * sx, ry = radius * sy;
                const ax = Math.max(0, Math.floor(cx - rx)), bx = Math.min(this.labelW - 1, Math.ceil(cx + rx));
                const ay = Math.max(0, Math.floor(cy - ry)), by = Math.min(this.labelH - 1, Math.ceil(cy + ry));
                for (let py = ay; py <= by; py++) {
                    const dy = (py + 0.5 - cy) / ry;
                    for (let px = ax; px <= bx; px++) {
                        const dx = (px + 0.5 - cx) / rx;
                        if (dx * dx + dy * dy > 1) continue;
                        const o = py * this.labelW + px;
                        if (erase) {
                            if (this.labels[o] === id) this.labels[o] = 0;
                        } else {
                            this.labels[o] = id;
                        }
                    }
                }
                minX = Math.min(minX, ax); minY = Math.min(minY, ay);
                maxX = Math.max(maxX, bx); maxY = Math.max(maxY, by);
            }
            g.last = [x, y];
            if (minX <= maxX && minY <= maxY) this.updateOverlay(minX, minY, maxX + 1, maxY + 1);
            this.render();
        }

        // ---- keyboard

        onKeyDown(e) {
            const target = e.target;
            if (target && /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName) && target.type !== "range" && target.type !== "button") return;
            const ctrl = e.ctrlKey || e.metaKey;
            const key = e.key;
            let handled = true;
            if (ctrl && (key === "z" || key === "Z") && !e.shiftKey) this.undo();
            else if (ctrl && ((key === "z" || key === "Z") && e.shiftKey || key === "y")) this.redo();
            else if (ctrl || e.altKey) handled = false;
            else if (key === "Delete" || key === "Backspace") {
                if (this.selected >= 0) this.deleteRegion(this.selected);
                else this.status("Select a region to delete (click it or its list entry)");
            } else if (key === "Escape") this.select(-1);
            else if (key.startsWith("Arrow")) handled = this.nudge(key, e.shiftKey ? 8 * GRID : GRID);
            else if (key === "b" || key === "B") this.setTool("box");
            else if (key === "p" || key === "P") this.setTool("brush");
            else if (key === "e" || key === "E") this.setTool("eraser");
            else if (key === "[" || key === "]") this.setBrush(this.brush + (key === "]" ? 4 : -4));
            else handled = false;
            if (handled) {
                e.preventDefault();
                e.stopPropagation();
            }
        }

        nudge(key, step) {
            const r = this.regions[this.selected];
            if (!r || r.kind !== "box") return false;
            const [W, H] = this.size;
            const [t, l, b, rt] = this.boxPx(r);
            let dx = {ArrowLeft: -step, ArrowRight: step}[key] || 0;
            let dy = {ArrowUp: -step, ArrowDown: step}[key] || 0;
            dx = Math.min(Math.max(dx, -l), W - rt);
            dy = Math.min(Math.max(dy, -t), H - b);
            if (dx || dy) {
                this.pushUndo();
                this.setBoxPx(r, [t + dy, l + dx, b + dy, rt + dx]);
                this.afterChange(true);
                this.status(`Region ${this.selected + 1}: box ${this.describeBox(r)}`);
            }
            return true;
        }

        setTool(tool) {
            this.tool = tool;
            for (const [name, button] of Object.entries(this.toolButtons)) {
                button.setAttribute("aria-pressed", String(name === tool));
            }
            this.canvas.style.cursor = tool === "box" ? "default" : "crosshair";
        }

        setBrush(size) {
            this.brush = Math.min(Math.max(Math.round(size), 2), 256);
            this.brushInput.value = String(this.brush);
            this.brushLabel.textContent = `${this.brush} px`;
        }

        describeBox(r) {
            return this.boxPx(r).map(v => Math.round(v)).join(", ") + " px";
        }

        // ---- files

        async uploadReference(file) {
            try {
                this.reference = await loadImage(URL.createObjectURL(file));
                this.clearReference.hidden = false;
                this.render();
                this.status(`Reference image ${file.name} shown under the regions (not used for generation)`);
            } catch (e) {
                this.status(`${file.name}: ${e.message}`, true);
            }
        }

        /** One region per colour of a colour-coded mask; colours of existing regions stay theirs. */
        async uploadMask(file) {
            let img;
            try {
                img = await loadImage(URL.createObjectURL(file));
            } catch (e) {
                return this.status(`${file.name}: ${e.message}`, true);
            }
            const [W, H] = this.size;
            const data = pixelsOf(img, W, H);
            const counts = new Map();
            for (let i = 0; i < W * H; i++) {
                if (data[4 * i + 3] < 128) continue;
                const v = (data[4 * i] << 16) | (data[4 * i + 1] << 8) | data[4 * i + 2];
                if (v) counts.set(v, (counts.get(v) || 0) + 1);
            }
            const colors = [...counts.entries()].filter(([, n]) => n >= MIN_COLOR_SHARE * W * H).sort((a, b) => b[1] - a[1]);
            if (!colors.length) return this.status(`${file.name}: no coloured (non-black) pixels`, true);
            this.pushUndo();
            for (const r of this.regions) if (r.kind === "paint") r.kind = "none"; // the upload replaces all paint
            const idOf = new Map();
            let skipped = 0;
            for (const [v] of colors) {
                const hex = "#" + v.toString(16).padStart(6, "0");
                let r = this.regions.find(q => q.color === hex);
                if (!r) {
                    if (this.regions.length >= MAX_REGIONS) {
                        skipped++;
                        continue;
                    }
                    r = this.addRegion("paint");
                    r.color = hex;
                }
                r.kind = "paint";
                r.box = null;
                idOf.set(v, r.id);
            }
            this.setLabelsFrom(data, W, H, idOf);
            this.invalidateMask();
            this.afterChange(true);
            this.status(`Mask ${file.name}: ${idOf.size} painted region(s)` + (skipped ? `, ${skipped} colour(s) over the ${MAX_REGIONS}-region limit ignored` : ""));
        }

        downloadMask() {
            const [W, H] = this.size;
            this.rasterize().toBlob(blob => {
                const a = el("a", {href: URL.createObjectURL(blob), download: `mix-of-show-mask-${W}x${H}.png`});
                document.body.append(a);
                a.click();
                setTimeout(() => {
                    URL.revokeObjectURL(a.href);
                    a.remove();
                }, 1000);
            }, "image/png");
        }

        // ---- drawing

        layout() {
            const width = this.stage.clientWidth;
            if (!width) return; // hidden (another tab, or the script not selected): laid out when shown
            const [W, H] = this.size;
            const maxH = Math.max(160, Math.min(window.innerHeight * 0.6, 720));
            let w = width, h = width * H / W;
            if (h > maxH) {
                h = maxH;
                w = maxH * W / H;
            }
            const dpr = window.devicePixelRatio || 1;
            this.canvas.style.width = `${w}px`;
            this.canvas.style.height = `${h}px`;
            this.canvas.width = Math.max(1, Math.round(w * dpr));
            this.canvas.height = Math.max(1, Math.round(h * dpr));
            this.render();
        }

        /** The painted label map as a translucent colour overlay (selected region stronger). */
        rebuildOverlay() {
            if (!this.labels) {
                this.overlay = null;
                return;
            }
            if (!this.overlay || this.overlay.width !== this.labelW || this.overlay.height !== this.labelH) {
                this.overlay = el("canvas", {width: this.labelW, height: this.labelH});
                this.overlayData = this.overlay.getContext("2d").createImageData(this.labelW, this.labelH);
            }
            this.updateOverlay(0, 0, this.labelW, this.labelH);
        }

        updateOverlay(x0, y0, x1, y1) {
            if (!this.overlay || this.overlay.width !== this.labelW || this.overlay.height !== this.labelH) {
                this.rebuildOverlay();
                return;
            }
            const sel = this.regions[this.selected];
            const look = new Map(this.regions.map(r => [r.id, [hexToInt(r.color), sel && r.id === sel.id ? 170 : 110]]));
            const d = this.overlayData.data;
            for (let y = y0; y < y1; y++) {
                for (let x = x0; x < x1; x++) {
                    const i = y * this.labelW + x;
                    const o = 4 * i;
                    const c = look.get(this.labels[i]);
                    if (c) {
                        d[o] = c[0] >> 16;
                        d[o + 1] = (c[0] >> 8) & 255;
                        d[o + 2] = c[0] & 255;
                        d[o + 3] = c[1];
                    } else {
                        d[o + 3] = 0;
                    }
                }
            }
            this.overlay.getContext("2d").putImageData(this.overlayData, 0, 0, x0, y0, x1 - x0, y1 - y0);
        }

        render() {
            const c = this.canvas;
            if (!c.width || !this.stage.clientWidth) return;
            const ctx = c.getContext("2d");
            const [W, H] = this.size;
            const k = c.width / W;
            ctx.setTransform(1, 0, 0, 1, 0, 0);
            ctx.fillStyle = "#1f1f24";
            ctx.fillRect(0, 0, c.width, c.height);
            if (this.reference) { // cover, centred: how a pose or sketch image is usually fitted
                const img = this.reference;
                const s = Math.max(c.width / img.naturalWidth, c.height / img.naturalHeight);
                const w = img.naturalWidth * s, h = img.naturalHeight * s;
                ctx.drawImage(img, (c.width - w) / 2, (c.height - h) / 2, w, h);
            }
            if (this.overlay) {
                ctx.imageSmoothingEnabled = false;
                ctx.drawImage(this.overlay, 0, 0, c.width, c.height);
            }
            const dpr = window.devicePixelRatio || 1;
            const boxes = this.regions.map((r, i) => [r, i]).filter(([r]) => r.kind === "box");
            const g = this.gesture;
            if (g && g.draft) {
                const r = this.regions[this.selected];
                boxes.push([{kind: "box", units: "px", box: g.draft, color: r && r.kind === "none" ? r.color : this.freeColor()}, -2]);
            }
            for (const [r, i] of boxes) {
                const [t, l, b, rt] = this.boxPx(r).map(v => v * k);
                const selected = i === this.selected || i === -2;
                ctx.fillStyle = rgba(r.color, selected ? 0.45 : 0.3);
                ctx.fillRect(l, t, rt - l, b - t);
                ctx.lineWidth = (selected ? 3 : 2) * dpr;
                ctx.strokeStyle = r.color;
                ctx.setLineDash([]);
                ctx.strokeRect(l, t, rt - l, b - t);
                if (selected) {
                    ctx.strokeStyle = "#ffffff";
                    ctx.lineWidth = 1.5 * dpr;
                    ctx.setLineDash([5 * dpr, 4 * dpr]);
                    ctx.strokeRect(l, t, rt - l, b - t);
                    ctx.setLineDash([]);
                }
                if (i >= 0) {
                    ctx.font = `bold ${13 * dpr}px sans-serif`;
                    ctx.fillStyle = "#000000";
                    ctx.fillRect(l, t, 18 * dpr, 17 * dpr);
                    ctx.fillStyle = "#ffffff";
                    ctx.fillText(String(i + 1), l + 4 * dpr, t + 13 * dpr);
                }
                if (selected && i >= 0 && this.tool === "box") {
                    const s = 7 * dpr;
                    ctx.fillStyle = "#ffffff";
                    ctx.strokeStyle = "#000000";
                    ctx.lineWidth = dpr;
                    for (const [hx, hy] of [[l, t], [(l + rt) / 2, t], [rt, t], [rt, (t + b) / 2], [rt, b], [(l + rt) / 2, b], [l, b], [l, (t + b) / 2]]) {
                        ctx.fillRect(hx - s / 2, hy - s / 2, s, s);
                        ctx.strokeRect(hx - s / 2, hy - s / 2, s, s);
                    }
                }
            }
        }

        renderList() {
            this.list.replaceChildren(...this.regions.map((r, i) => this.listEntry(r, i)));
            this.empty.hidden = this.regions.length > 0;
            this.addButton.disabled = this.regions.length >= MAX_REGIONS;
            this.undoButton.disabled = !this.undoStack.length;
            this.redoButton.disabled = !this.redoStack.length;
        }

        problem(r) {
            if (r.kind === "none") return "no shape yet: draw a box or paint it";
            if (r.kind === "box") {
                const p = this.boxProblem(r);
                if (p) return p;
            }
            if (!r.prompt.trim()) return "prompt is empty";
            const seen = new Set();
            for (const name of [...r.loras.map(l => l.name.trim()), ...promptLoraNames(r.prompt)]) {
                if (seen.has(name)) return `LoRA ${name} is given twice (listed, or as a <lora:…> tag in the prompt)`;
                seen.add(name);
            }
            if (r.globalWeight !== null && !(r.globalWeight >= 0 && r.globalWeight <= 1)) {
                return "global prompt weight must be in [0, 1]";
            }
            return "";
        }

        /** The spec's share of the main prompt inside regions: its input (unless typed there), and each
         * region's placeholder. */
        setGlobalWeight(value, typed) {
            this.globalWeight = value;
            if (!typed) {
                this.globalInput.value = String(value);
                this.globalInput.classList.toggle("mos-invalid", !(value >= 0 && value <= 1)); // as pasted
            }
            for (const input of this.list.querySelectorAll(".mos-region-global")) input.placeholder = this.globalPlaceholder();
        }

        globalPlaceholder() {
            return `${this.globalWeight}`;
        }

        /** A region's LoRAs and its own global prompt weight (empty: the spec's). */
        regionExtras(r, i, problem) {
            const label = `Region ${i + 1}`;
            const changed = () => {
                problem.textContent = this.problem(r);
                this.write();
            };
            const global = el("input", {type: "number", class: "mos-region-global", min: "0", max: "1", step: "0.05",
                value: r.globalWeight === null ? "" : String(r.globalWeight), placeholder: this.globalPlaceholder(),
                "aria-label": `${label} global prompt weight (empty: the value for all regions)`,
                oninput: e => {
                    const v = readShare(e.target);
                    e.target.classList.toggle("mos-invalid", Number.isNaN(v));
                    if (Number.isNaN(v) || v === r.globalWeight) return; // the JSON keeps the last valid value
                    r.globalWeight = v;
                    changed();
                },
                onchange: e => {
                    const v = settledShare(e.target, r.globalWeight, null);
                    e.target.value = v === null ? "" : String(v);
                    e.target.classList.remove("mos-invalid");
                    if (v === r.globalWeight) return;
                    r.globalWeight = v;
                    changed();
                }});
            const globalLabel = el("label", {class: "mos-region-global-label",
                title: "Share of the main prompt kept inside this region, 0 to 1; empty = the value for all regions "
                    + "(Global prompt inside regions)"}, [el("span", {text: "Global"}), global]);
            const loras = window.MixOfShowLoras;
            if (!loras) return el("div", {class: "mos-lora-bar"}, [globalLabel]); // the picker's file did not load
            return loras.editor({label, loras: r.loras, taken: () => new Set(promptLoraNames(r.prompt)),
                onchange: changed, extra: [globalLabel]});
        }

        listEntry(r, i) {
            const selected = i === this.selected;
            const problem = el("span", {class: "mos-problem", text: this.problem(r)});
            const input = (cls, field, placeholder, label) => el("input", {
                class: cls, type: "text", value: r[field], placeholder, "aria-label": label,
                oninput: e => {
                    r[field] = e.target.value;
                    problem.textContent = this.problem(r);
                    this.write();
                },
            });
            const kind = {box: "box", paint: "painted", none: "no shape"}[r.kind];
            const entry = el("li", {class: "mos-region", role: "option", "aria-selected": String(selected),
                "data-index": String(i)}, [
                el("button", {class: "mos-swatch", type: "button", text: String(i + 1), style: `background:${r.color}`,
                    title: `Select region ${i + 1} (${kind})`, "aria-label": `Select region ${i + 1}, ${kind}`,
                    onclick: () => this.select(i)}),
                el("div", {class: "mos-fields"}, [
                    input("mos-prompt", "prompt", `Region ${i + 1} prompt, e.g. a photo of <cat1> <cat2>`, `Region ${i + 1} prompt`),
                    input("mos-negative", "negative", "Negative prompt (optional)", `Region ${i + 1} negative prompt`),
                    this.regionExtras(r, i, problem),
                    el("div", {class: "mos-meta"}, [
                        el("span", {class: "mos-kind", text: r.kind === "box" ? `box ${this.describeBox(r)}` : kind}),
                        problem,
                    ]),
                ]),
                el("button", {class: "mos-delete", type: "button", text: "✕", title: `Delete region ${i + 1} (Delete)`,
                    "aria-label": `Delete region ${i + 1}`, onclick: () => this.deleteRegion(i)}),
            ]);
            // typing in a region's fields selects it without redrawing the list (focus stays put)
            entry.addEventListener("focusin", e => {
                if (this.selected === i || !e.target.matches("input")) return;
                this.selected = i;
                this.rebuildOverlay();
                this.render();
                for (const li of this.list.children) li.setAttribute("aria-selected", String(li === entry));
            });
            return entry;
        }

        status(text, error) {
            this.statusLine.textContent = text;
            this.statusLine.classList.toggle("mos-error", !!error);
        }

        build() {
            const button = (text, title, onclick, extra) => el("button", {type: "button", class: "mos-button", text, title,
                onclick, ...extra});
            const file = (accept, onfile) => el("input", {type: "file", accept, hidden: true,
                onchange: e => {
                    const f = e.target.files && e.target.files[0];
                    e.target.value = "";
                    if (f) onfile(f);
                }});
            this.toolButtons = {
                box: button("▭ Box", "Draw, move and resize boxes (B)", () => this.setTool("box"), {"aria-pressed": "true"}),
                brush: button("✎ Brush", "Paint the selected region, or a new one (P)", () => this.setTool("brush"), {"aria-pressed": "false"}),
                eraser: button("⌫ Eraser", "Erase the selected region's paint (E)", () => this.setTool("eraser"), {"aria-pressed": "false"}),
            };
            this.brushInput = el("input", {type: "range", min: "2", max: "256", step: "2", value: String(this.brush),
                "aria-label": "Brush size in pixels", oninput: e => this.setBrush(Number(e.target.value))});
            this.brushLabel = el("span", {class: "mos-brush-size", text: `${this.brush} px`});
            this.undoButton = button("↶ Undo", "Undo the last stroke or box edit (Ctrl+Z)", () => this.undo());
            this.redoButton = button("↷ Redo", "Redo (Ctrl+Shift+Z)", () => this.redo());
            this.addButton = button("+ Region", "Add a region row, then draw or paint it", () => {
                this.pushUndo();
                if (this.addRegion("none")) this.afterChange(true);
            });
            this.featherInput = el("input", {type: "number", min: "0", max: "64", step: "0.5", value: "0",
                class: "mos-feather", "aria-label": "Feather: soft region edges, in latent pixels (0 = hard)",
                onchange: e => {
                    const v = Number(e.target.value);
                    this.feather = Number.isFinite(v) ? Math.min(Math.max(v, 0), 64) : 0;
                    e.target.value = String(this.feather);
                    this.write();
                }});
            this.globalInput = el("input", {type: "number", min: "0", max: "1", step: "0.05", value: "0",
                class: "mos-global-weight", "aria-label": "Global prompt inside regions: share of the main prompt kept "
                    + "inside every region, 0 to 1",
                oninput: e => {
                    const v = readShare(e.target);
                    e.target.classList.toggle("mos-invalid", Number.isNaN(v));
                    if (Number.isNaN(v) || (v || 0) === this.globalWeight) return;
                    this.setGlobalWeight(v || 0, true);
                    this.write();
                },
                onchange: e => {
                    const v = settledShare(e.target, this.globalWeight, 0);
                    const write = v !== this.globalWeight;
                    this.setGlobalWeight(v);
                    if (write) this.write();
                }});
            const refInput = file("image/*", f => this.uploadReference(f));
            const maskInput = file("image/png,image/*", f => this.uploadMask(f));
            refInput.classList.add("mos-reference-input");
            maskInput.classList.add("mos-mask-input");
            this.clearReference = button("✕ Reference", "Hide the reference image", () => {
                this.reference = null;
                this.clearReference.hidden = true;
                this.render();
            }, {hidden: true});
            this.sizeLabel = el("span", {class: "mos-size", text: `${this.size[0]}×${this.size[1]}`});
            const toolbar = el("div", {class: "mos-toolbar", role: "toolbar", "aria-label": "Region canvas tools"}, [
                el("div", {class: "mos-group"}, Object.values(this.toolButtons)),
                el("label", {class: "mos-group", title: "Brush size ([ and ])"}, [el("span", {text: "Size"}), this.brushInput, this.brushLabel]),
                el("div", {class: "mos-group"}, [this.undoButton, this.redoButton]),
                el("div", {class: "mos-group"}, [this.addButton]),
                el("label", {class: "mos-group", title: "Soften every region's edge (latent pixels)"}, [el("span", {text: "Feather"}), this.featherInput]),
                el("label", {class: "mos-group", title: GLOBAL_HINT}, [el("span", {text: "Global prompt inside regions"}), this.globalInput]),
                el("div", {class: "mos-group"}, [
                    button("Reference…", "Show a sketch or pose image under the regions to trace", () => refInput.click()), this.clearReference,
                    button("Upload mask…", "Read a colour-coded mask: one painted region per colour", () => maskInput.click()),
                    button("Download mask", "Save every region as a colour-coded PNG", () => this.downloadMask()),
                    refInput, maskInput,
                ]),
                this.sizeLabel,
            ]);
            this.canvas = el("canvas", {class: "mos-surface", tabindex: "0", role: "application",
                "aria-label": "Region canvas. Drag to draw a box; drag a box to move it, its handles to resize. "
                    + "B box, P brush, E eraser, Delete removes the selected region, Ctrl+Z undoes, arrows move a box."});
            this.canvas.addEventListener("pointerdown", e => this.onPointerDown(e));
            this.canvas.addEventListener("pointermove", e => this.onPointerMove(e));
            this.canvas.addEventListener("pointerup", e => this.onPointerUp(e));
            this.canvas.addEventListener("pointercancel", e => this.onPointerUp(e));
            this.canvas.addEventListener("dragstart", e => e.preventDefault());
            this.stage = el("div", {class: "mos-stage"}, [this.canvas]);
            this.list = el("ol", {class: "mos-regions", role: "listbox", "aria-label": "Regions"});
            this.empty = el("p", {class: "mos-empty", text: "No regions: the main prompt is used everywhere. Drag on the canvas to draw one."});
            this.statusLine = el("div", {class: "mos-status", role: "status", "aria-live": "polite"});
            const hint = el("p", {class: "mos-global-hint", text: `Global prompt inside regions: ${GLOBAL_HINT}`});
            this.root.replaceChildren(toolbar, hint, el("div", {class: "mos-body"}, [this.stage, el("div", {class: "mos-side"}, [this.list, this.empty])]), this.statusLine);
            this.root.addEventListener("keydown", e => this.onKeyDown(e));
            new ResizeObserver(() => this.layout()).observe(this.stage);
            this.renderList();
        }
    }

    function scan() {
        for (const root of app().querySelectorAll(".mos-canvas")) {
            if (root.dataset.ready) continue;
            root.dataset.ready = "1";
            instances.set(root.dataset.regions, new RegionCanvas(root));
        }
    }

    // Slider drags and typing reach the canvas at once; anything else within a poll interval.
    document.addEventListener("input", () => instances.forEach(c => c.poll()), true);
    window.mixOfShowCanvas = instances; // for tests and for anyone debugging a page
    if (typeof onUiLoaded === "function") {
        onUiLoaded(scan);
        onAfterUiUpdate(scan);
    } else {
        document.addEventListener("DOMContentLoaded", scan);
    }
})();
