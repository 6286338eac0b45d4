/*
 * Mix-of-Show region canvas: the editor, `RegionCanvas`, mounted on each `.mos-canvas` element by
 * javascript/mix_of_show.js. It extends the region model (mix_of_show_regions.js) with
 * - the host page: it follows the size sliders and the "Regions (JSON)" textbox (polled, and on every
 *   input event), loads what others wrote there and writes back every edit;
 * - the drawing surface: reference image, painted overlay, boxes with their handles;
 * - the tools: box (draw, move, resize, snapped to the 8 px latent grid), brush and eraser (a hard
 *   disc into the label map), keyboard shortcuts, undo/redo, mask upload and download.
 * Boxes drawn here are written in fraction units snapped to the 8 px latent grid, so they follow the
 * size sliders; painted regions live in a label map (one region id per pixel, no antialiasing) that
 * is encoded with exact colours.
 *
 * Its toolbar, region list and status line are built by the methods that
 * mix_of_show_regions_panel.js adds to this class. Exposed as `window.MixOfShow.RegionCanvas`.
 */
(function() {
    "use strict";

    const MOS = window.MixOfShow = window.MixOfShow || {};
    const {app, el, hexToInt, fireInput} = MOS.util;
    const {maskURL, loadImage, pixelsOf, maskColors} = MOS.png;
    const {MAX_REGIONS, GRID, parseSpec} = MOS.regions;

    const HANDLES = ["nw", "n", "ne", "e", "se", "s", "sw", "w"];

    function rgba(color, alpha) {
        const v = hexToInt(color);
        return `rgba(${v >> 16},${(v >> 8) & 255},${v & 255},${alpha})`;
    }

    class RegionCanvas extends MOS.RegionModel {
        constructor(root) {
            super();
            this.root = root;
            this.regionsId = root.dataset.regions;
            this.tab = root.dataset.tab || "txt2img";
            this.writeSeq = 0;
            this.tool = "box";
            this.brush = 24;
            this.gesture = null;
            this.reference = null;
            this.seen = null; // last textbox value looked at
            this.written = null; // last textbox value written by the canvas
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
                if (MOS.instances.get(this.regionsId) === this) MOS.instances.delete(this.regionsId);
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
            this.setPasses(spec.passes, spec.pass_unet_weight);
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

        // ---- editing

        restore(s) {
            super.restore(s);
            this.featherInput.value = String(this.feather);
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
            return super.addRegion(kind);
        }

        deleteRegion(index) {
            if (index < 0 || index >= this.regions.length) return;
            this.pushUndo();
            this.removeRegion(index);
            this.afterChange(true);
            this.status(`Region ${index + 1} deleted (Ctrl+Z brings it back)`);
        }

        select(index) {
            this.selected = index;
            this.rebuildOverlay();
            this.renderList();
            this.render();
        }

        // ---- pointer position (image pixels at the current size)

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
            const colors = maskColors(data, W, H);
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
    }

    MOS.RegionCanvas = RegionCanvas;
})();
