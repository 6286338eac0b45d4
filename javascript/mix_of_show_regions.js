/*
 * Mix-of-Show region canvas: the region model, with no page or drawing in it.
 *
 * - the spec's JSON form, lib_mos/regional/regions.py's (and the authors' textual form), read by `parseSpec`
 *   and written by `RegionModel.toJSON`;
 * - `RegionModel`, the state the canvas edits: region records {id, prompt, negative, kind: box|paint|
 *   none, box, units, color, loras, globalWeight}, the painted label map (one region id per pixel),
 *   feather, the spec's global prompt weight, the selection, and the undo/redo snapshots;
 * - the rules a region is checked against (`problem`) and box geometry in image pixels.
 *
 * Each region may list LoRAs applied inside it only ("loras": [{"name", "weight"}]) and its own share
 * of the main prompt ("global_weight", else the spec's "global_weight", default 0). Like typed
 * prompts, these fields are text edits: no undo entry, and undoing a shape keeps them.
 *
 * Exposed as `window.MixOfShow.regions` (constants and functions) and `window.MixOfShow.RegionModel`,
 * which RegionCanvas (mix_of_show_regions_canvas.js, loaded after this file) extends.
 */
(function() {
    "use strict";

    const MOS = window.MixOfShow = window.MixOfShow || {};
    const {hexToInt} = MOS.util;
    const {encodeIndexedPNG, labelsOf} = MOS.png;

    const MAX_REGIONS = 16;
    const PASS_UNET_WEIGHT = 0.25; // lib_mos.regional.regions.PASS_UNET_WEIGHT: a region LoRA's UNet share in its pass
    // A drawing started on the canvas has region LoRAs in passes of their own: they placed several concepts
    // best (docs/results.md). A spec without the field (pasted, the API's, an older infotext) keeps one pass.
    const NEW_PASSES = true;
    const GRID = 8; // output pixels per latent cell
    const MAX_UNDO = 50;
    const PALETTE = [
        "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
        "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#ffd8b1",
    ];
    const TEXT_FIELDS = ["prompt", "negative", "loras", "globalWeight"]; // typed, not drawn: outside undo
    // the host's extra-network tag, as lib_mos.regional.regions reads it: <kind:arg:arg...>
    const EXTRA_NETWORK_TAG = /<(\w+):([^>]+)>/g;

    /** Names of the `<lora:name:w>` (or `<lyco:...>`) tags in a region prompt. */
    function promptLoraNames(prompt) {
        const names = [];
        for (const m of (prompt || "").matchAll(EXTRA_NETWORK_TAG)) {
            if (m[1] === "lora" || m[1] === "lyco") names.push(m[2].split(":")[0].trim());
        }
        return names;
    }

    function copyRegion(r) {
        return {...r, box: r.box && r.box.slice(), loras: r.loras.map(l => ({...l}))};
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
        return {regions, feather: 0, mask_image: null, global_weight: 0, passes: false,
            pass_unet_weight: PASS_UNET_WEIGHT};
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
        if (!trimmed) return {regions: [], feather: 0, mask_image: null, global_weight: 0, passes: NEW_PASSES,
            pass_unet_weight: PASS_UNET_WEIGHT};
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
        if (data.passes !== undefined && typeof data.passes !== "boolean") throw new Error("field 'passes' must be true or false");
        const unet = data.pass_unet_weight;
        if (unet !== undefined && !(Number.isFinite(unet) && unet >= 0 && unet <= 1)) {
            throw new Error("field 'pass_unet_weight' must be a number in [0, 1]");
        }
        return {regions, feather, mask_image: mask, global_weight: globalWeight, passes: data.passes === true,
            pass_unet_weight: unet === undefined ? PASS_UNET_WEIGHT : unet};
    }

    // ------------------------------------------------------------------------- the region model

    class RegionModel {
        constructor() {
            this.regions = []; // {id, prompt, negative, kind: box|paint|none, box, units, color, loras, globalWeight}
            this.feather = 0;
            this.globalWeight = 0; // the spec's share of the main prompt inside regions
            this.passes = NEW_PASSES; // each region with LoRAs in a UNet pass of its own
            this.passUnetWeight = PASS_UNET_WEIGHT; // with passes, a region LoRA's UNet share in its pass
            this.labels = null; // Uint8Array of region ids, labelW x labelH; shared with undo snapshots
            this.labelW = 0;
            this.labelH = 0;
            this.labelsShared = false;
            this.mask = null; // the mask_image text for the current labels (null: encode on write)
            this.maskVersion = 0; // bumped whenever `mask` stops describing the labels
            this.selected = -1;
            this.undoStack = [];
            this.redoStack = [];
            this.size = [512, 512]; // the generation's width x height
            this.loadSeq = 0; // bumped whenever the labels change hands: a mask still decoding is dropped
        }

        // ---- the JSON

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
            if (this.passes) out.passes = true;
            if (this.passUnetWeight !== PASS_UNET_WEIGHT) out.pass_unet_weight = this.passUnetWeight;
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

        setLabelsFrom(data, W, H, idOf) {
            this.labels = labelsOf(data, W, H, idOf);
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

        // ---- undo snapshots (shapes, paint, feather, selection; typed fields stay as they are)

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
            this.selected = Math.min(s.selected, this.regions.length - 1);
            this.loadSeq++;
        }

        pushUndo(snap) {
            this.undoStack.push(snap || this.snapshot());
            if (this.undoStack.length > MAX_UNDO) this.undoStack.shift();
            this.redoStack.length = 0;
        }

        // ---- region records

        /** A new region at the end of the list, selected; the caller checks MAX_REGIONS. */
        addRegion(kind) {
            const region = {id: this.freeId(), prompt: "", negative: "", kind: kind || "none", box: null,
                units: "fraction", color: this.freeColor(), loras: [], globalWeight: null};
            this.regions.push(region);
            this.selected = this.regions.length - 1;
            return region;
        }

        /** Region `index` and its paint gone; the selection moves to its successor. */
        removeRegion(index) {
            const [gone] = this.regions.splice(index, 1);
            if (gone.kind === "paint" && this.labels) {
                this.ownLabels();
                for (let i = 0; i < this.labels.length; i++) if (this.labels[i] === gone.id) this.labels[i] = 0;
                this.invalidateMask();
            }
            this.selected = Math.min(index, this.regions.length - 1);
        }

        /** The label map at W x H (nearest, pixel centres: lib_mos.regional.regions' rule); null without paint. */
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

        describeBox(r) {
            return this.boxPx(r).map(v => Math.round(v)).join(", ") + " px";
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
    }

    MOS.regions = {MAX_REGIONS, GRID, PASS_UNET_WEIGHT, parseSpec, promptLoraNames};
    MOS.RegionModel = RegionModel;
})();
